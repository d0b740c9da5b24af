import { useEffect, useState } from "react";
import { getPrediction, type AnyPrediction } from "../api/client";
import { ErrorMessage } from "../components/ErrorMessage";
import { ResultCard } from "../components/ResultCard";

export function DetailPage({ id }: { id: string }) {
  const [record, setRecord] = useState<AnyPrediction | null>(null);
  const [error, setError] = useState<unknown>(null);

  useEffect(() => {
    let cancelled = false;
    setRecord(null);
    setError(null);
    getPrediction(id).then((r) => { if (!cancelled) setRecord(r); }, (e) => { if (!cancelled) setError(e); });
    return () => { cancelled = true; };
  }, [id]);

  return (
    <section aria-labelledby="detail-title">
      <p><a href="#/history">← Back to the history</a></p>
      <h1 id="detail-title">Prediction {id.slice(0, 8)}</h1>
      {error != null && <ErrorMessage error={error} context="Could not load this prediction" />}
      {record && (
        <>
          <ResultCard result={record} />
          <p>
            {record.result_url
              ? <a href={record.result_url} data-testid="result-link" rel="noreferrer">Stored result (JSON)</a>
              : <span className="muted">No stored result link.</span>}
          </p>
          <details open>
            <summary>The record as the API returns it</summary>
            <pre className="json" data-testid="record-json" tabIndex={0}>{JSON.stringify(record, null, 2)}</pre>
          </details>
        </>
      )}
    </section>
  );
}
