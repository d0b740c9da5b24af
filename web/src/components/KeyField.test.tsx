import { render, screen } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { describe, expect, it, vi } from "vitest";
import { authHeaders } from "../api/keyStore";
import { ErrorMessage } from "./ErrorMessage";
import { KeyField } from "./KeyField";
import { ApiError } from "../api/errors";

describe("KeyField", () => {
  it("keeps the key in session storage only and sends it as a Bearer header", async () => {
    const onChange = vi.fn();
    render(<KeyField onChange={onChange} />);
    const input = screen.getByLabelText("API key");
    expect(input).toHaveAttribute("type", "password");
    await userEvent.type(input, "  d3_0123456789abcdef_secret  ");
    await userEvent.click(screen.getByRole("button", { name: "Use key" }));
    expect(sessionStorage.getItem("d3.apiKey")).toBe("d3_0123456789abcdef_secret");
    expect(localStorage.length).toBe(0);
    expect(authHeaders()).toEqual({ Authorization: "Bearer d3_0123456789abcdef_secret" });
    expect(onChange).toHaveBeenLastCalledWith(true);
    await userEvent.click(screen.getByRole("button", { name: "Forget" }));
    expect(sessionStorage.getItem("d3.apiKey")).toBeNull();
    expect(authHeaders()).toEqual({});
  });
});

describe("ErrorMessage", () => {
  it("is an alert with plain words, the retry time and the service's message", () => {
    render(<ErrorMessage error={new ApiError(429, "rate_limited", "rate limit exceeded: 120 per 1 minute", 12)} context="photo.jpg" />);
    const alert = screen.getByRole("alert");
    expect(alert).toHaveTextContent("photo.jpg: Too many requests for now.");
    expect(alert).toHaveTextContent("Try again in 12 seconds.");
    expect(alert).toHaveTextContent("(429 rate_limited): rate limit exceeded");
  });
});
