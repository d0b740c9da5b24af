import { ApiError, explain } from "../api/errors";

/** A refused call in plain words, with the service's own message underneath. */
export function ErrorMessage({ error, context }: { error: unknown; context?: string }) {
  const apiError = error instanceof ApiError ? error : new ApiError(-1, "error", String(error));
  const { title, advice } = explain(apiError);
  return (
    <div className="error" role="alert" data-testid="error" data-status={apiError.status}>
      <p className="error-title">
        {context ? `${context}: ` : ""}
        {title}
      </p>
      <p>{advice}</p>
      {apiError.status > 0 && (
        <p className="error-detail">
          The service said ({apiError.status} {apiError.code}): {apiError.detail}
        </p>
      )}
    </div>
  );
}
