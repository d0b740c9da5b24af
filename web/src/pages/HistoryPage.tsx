import { useCallback, useEffect, useId, useState, type FormEvent } from "react";
import { listPredictions, type PredictionList } from "../api/client";
import { ErrorMessage } from "../components/ErrorMessage";
import { buildListQuery, EMPTY_FILTERS, MEDIA_TYPES, PAGE_SIZES, type HistoryFilters } from "../history";
import { formatProbability } from "../media";

export function HistoryPage() {
  const [draft, setDraft] = useState<HistoryFilters>(EMPTY_FILTERS);
  const [applied, setApplied] = useState<HistoryFilters>(EMPTY_FILTERS);
  const [limit, setLimit] = useState<number>(PAGE_SIZES[0]);
  // cursors[i] opens page i+1; the first page needs none. "Previous" pops back.
  const [cursors, setCursors] = useState<(string | null)[]>([null]);
  const [page, setPage] = useState<PredictionList | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [loading, setLoading] = useState(false);
  const id = useId();

  const load = useCallback(async (filters: HistoryFilters, size: number, cursor: string | null) => {
    setLoading(true);
    setError(null);
    try {
      setPage(await listPredictions(buildListQuery(filters, size, cursor)));
    } catch (e) {
      setError(e);
      setPage(null);
    } finally {
      setLoading(false);
    }
  }, []);

  useEffect(() => {
    void load(applied, limit, cursors[cursors.length - 1]);
  }, [load, applied, limit, cursors]);

  const apply = (event: FormEvent) => {
    event.preventDefault();
    setApplied({ ...draft });
    setCursors([null]);
  };
  const reset = () => {
    setDraft(EMPTY_FILTERS);
    setApplied(EMPTY_FILTERS);
    setCursors([null]);
  };
  const set = (name: keyof HistoryFilters) => (e: { target: { value: string } }) =>
    setDraft({ ...draft, [name]: e.target.value });
  const pageNumber = cursors.length;
  const first = page && page.count ? (pageNumber - 1) * limit + 1 : 0;

  return (
    <section aria-labelledby="history-title">
      <h1 id="history-title">History</h1>
      <form className="filters" onSubmit={apply} aria-label="Filters">
        <div>
          <label htmlFor={`${id}-verdict`}>Verdict</label>
          <select id={`${id}-verdict`} value={draft.prediction} onChange={set("prediction")}>
            <option value="">any</option>
            <option value="fake">fake</option>
            <option value="real">real</option>
          </select>
        </div>
        <div>
          <label htmlFor={`${id}-media`}>Media type</label>
          <select id={`${id}-media`} value={draft.media_type} onChange={set("media_type")}>
            <option value="">any</option>
            {MEDIA_TYPES.map((m) => <option key={m.value} value={m.value}>{m.label}</option>)}
          </select>
        </div>
        <div>
          <label htmlFor={`${id}-since`}>From</label>
          <input id={`${id}-since`} type="date" value={draft.since} onChange={set("since")} />
        </div>
        <div>
          <label htmlFor={`${id}-until`}>To</label>
          <input id={`${id}-until`} type="date" value={draft.until} onChange={set("until")} />
        </div>
        <div>
          <label htmlFor={`${id}-min`}>Min. probability</label>
          <input id={`${id}-min`} type="number" min={0} max={1} step={0.05} value={draft.min_probability}
                 onChange={set("min_probability")} />
        </div>
        <div>
          <label htmlFor={`${id}-max`}>Max. probability</label>
          <input id={`${id}-max`} type="number" min={0} max={1} step={0.05} value={draft.max_probability}
                 onChange={set("max_probability")} />
        </div>
        <div>
          <label htmlFor={`${id}-file`}>File name contains</label>
          <input id={`${id}-file`} type="search" maxLength={255} value={draft.filename} onChange={set("filename")} />
        </div>
        <div>
          <label htmlFor={`${id}-size`}>Per page</label>
          <select id={`${id}-size`} value={limit}
                  onChange={(e) => { setLimit(Number(e.target.value)); setCursors([null]); }}>
            {PAGE_SIZES.map((n) => <option key={n} value={n}>{n}</option>)}
          </select>
        </div>
        <div className="filter-actions">
          <button type="submit">Apply filters</button>
          <button type="button" className="secondary" onClick={reset}>Clear</button>
        </div>
      </form>

      {error != null && <ErrorMessage error={error} context="Could not load the history" />}
      {page && (
        <>
          <p className="muted" aria-live="polite" data-testid="history-summary">
            {page.total === 0 ? "No predictions match." :
              `Showing ${first}–${first + page.count! - 1} of ${page.total} (page ${pageNumber}).`}
          </p>
          <div className="table-wrap">
            <table className="history" data-testid="history-table">
              <caption className="visually-hidden">Past predictions, newest first</caption>
              <thead>
                <tr><th scope="col">When</th><th scope="col">File</th><th scope="col">Media</th>
                  <th scope="col">Verdict</th><th scope="col">Probability</th><th scope="col">Status</th></tr>
              </thead>
              <tbody>
                {page.results.map((row) => (
                  <tr key={row.id} data-testid="history-row">
                    <td><time dateTime={row.created_at}>{new Date(row.created_at).toLocaleString()}</time></td>
                    <td><a href={`#/history/${row.id}`} data-testid="history-link">{row.filename || row.id.slice(0, 8)}</a></td>
                    <td>{row.media_type}</td>
                    <td><span className={`verdict small ${row.prediction ?? ""}`}>{row.prediction ?? "–"}</span></td>
                    <td data-testid="history-probability">{formatProbability(row.fake_probability)}</td>
                    <td>{row.status}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        </>
      )}
      <nav className="pager" aria-label="Pages">
        <button type="button" className="secondary" disabled={loading || cursors.length <= 1}
                onClick={() => setCursors(cursors.slice(0, -1))}>Previous page</button>
        <button type="button" disabled={loading || !page?.next_cursor}
                onClick={() => page?.next_cursor && setCursors([...cursors, page.next_cursor])}>Next page</button>
      </nav>
    </section>
  );
}
