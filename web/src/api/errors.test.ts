import { describe, expect, it } from "vitest";
import { ApiError, explain, parseRetryAfter, toApiError } from "./errors";

describe("errors", () => {
  it("parses Retry-After as seconds or an HTTP date", () => {
    expect(parseRetryAfter("7")).toBe(7);
    expect(parseRetryAfter(null)).toBeNull();
    const now = Date.parse("2026-12-01T10:00:00Z");
    expect(parseRetryAfter("Tue, 01 Dec 2026 10:01:30 GMT", now)).toBe(90);
    expect(parseRetryAfter("soon")).toBeNull();
  });

  it("reads the service's error body", () => {
    const error = toApiError(400, { error: { code: "invalid_parameter", message: "threshold must be between 0 and 1", parameter: "threshold" } }, null);
    expect(error.code).toBe("invalid_parameter");
    expect(error.parameter).toBe("threshold");
    expect(explain(error).advice).toContain("threshold");
    expect(toApiError(502, "<html>", null).detail).toBe("the service answered 502"); // not JSON: still a message
  });

  it.each([
    [401, "Your API key was not accepted."],
    [403, "This API key may not do that."],
    [413, "The file is too large for the service."],
    [415, "This type of file is not supported."],
    [422, "The file could not be read."],
  ])("says what a %i means", (status, title) => {
    expect(explain(new ApiError(status, "x", "y")).title).toBe(title);
  });

  it("says when to retry after 429 and 503", () => {
    expect(explain(new ApiError(429, "rate_limited", "slow down", 30)).advice).toBe("Try again in 30 seconds.");
    expect(explain(new ApiError(503, "unavailable", "busy", 180)).advice).toBe("Try again in 3 minutes.");
    expect(explain(new ApiError(503, "unavailable", "busy", null)).advice).toBe("Try again in a little while.");
  });
});
