import type { components } from "./schema";

type ErrorBody = components["schemas"]["Error"];

/** A refused or failed call: the status, the service's own code and message, and when to retry. */
export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  readonly detail: string;
  readonly retryAfter: number | null;
  readonly parameter: string | null;

  constructor(status: number, code: string, detail: string, retryAfter: number | null = null, parameter: string | null = null) {
    super(`${status} ${code}: ${detail}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.retryAfter = retryAfter;
    this.parameter = parameter;
  }
}

/** Retry-After is delta-seconds (what the service sends) or an HTTP date. */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | null {
  if (value == null || value.trim() === "") return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - now) / 1000));
}

export function toApiError(status: number, body: unknown, retryAfter: string | null): ApiError {
  const error = (body as Partial<ErrorBody> | null)?.error;
  const code = typeof error?.code === "string" ? error.code : "error";
  const message = typeof error?.message === "string" ? error.message : `the service answered ${status}`;
  const parameter = typeof error?.parameter === "string" ? error.parameter : null;
  return new ApiError(status, code, message, parseRetryAfter(retryAfter), parameter);
}

/** Network failure: no status at all. */
export const NETWORK_ERROR_STATUS = 0;

function retryText(seconds: number | null): string {
  if (seconds == null) return "Try again in a little while.";
  if (seconds <= 1) return "Try again in a second.";
  if (seconds < 120) return `Try again in ${seconds} seconds.`;
  return `Try again in ${Math.ceil(seconds / 60)} minutes.`;
}

/** Plain words for what went wrong and what to do, one sentence or two. */
export function explain(error: ApiError): { title: string; advice: string } {
  switch (error.status) {
    case NETWORK_ERROR_STATUS:
      return { title: "The service could not be reached.", advice: "Check your connection, or whether the service is running, then try again." };
    case 400:
      return { title: "The request was not accepted.", advice: error.parameter ? `Check the “${error.parameter}” setting.` : "Check the settings and try again." };
    case 401:
      return { title: "Your API key was not accepted.", advice: "Enter a valid API key in the key field at the top of the page. Keys look like d3_<id>_<secret>." };
    case 403:
      return { title: "This API key may not do that.", advice: "Ask the service's administrator for a key with the right permissions." };
    case 404:
      return { title: "Not found.", advice: "The record may have been removed, or belong to another key." };
    case 413:
      return { title: "The file is too large for the service.", advice: "Try a smaller or shorter file." };
    case 415:
      return { title: "This type of file is not supported.", advice: "Images: JPEG, PNG, WebP, BMP, GIF or TIFF. Videos: MP4/MOV, WebM, AVI, MPEG-TS and similar." };
    case 422:
      return { title: "The file could not be read.", advice: "It may be truncated, corrupt, or not what its name says." };
    case 429:
      return { title: "Too many requests for now.", advice: retryText(error.retryAfter) };
    case 503:
      return { title: "The service is busy or temporarily unavailable.", advice: retryText(error.retryAfter) };
    default:
      return { title: `The service answered with an error (${error.status}).`, advice: "Try again; if it keeps happening, tell the service's administrator." };
  }
}
