import { useCallback, useEffect, useId, useState, type FormEvent } from "react";
import { getStats, listPredictions, type Stats } from "../api/client";
import { BarChart, histogram, SplitBar } from "../components/Charts";
import { ErrorMessage } from "../components/ErrorMessage";
import { dayBoundary } from "../history";

const SAMPLE = 500; // the newest records whose processing times make the histogram

export function StatsPage() {
  const [since, setSince] = useState("");
  const [until, setUntil] = useState("");
  const [stats, setStats] = useState<Stats | null>(null);
  const [times, setTimes] = useState<number[]>([]);
  const [error, setError] = useState<unknown>(null);
  const id = useId();

  const load = useCallback(async (from: string, to: string) => {
    setError(null);
    const range = { since: dayBoundary(from, false), until: dayBoundary(to, true) };
    try {
      const [s, recent] = await Promise.all([
        getStats(range),
        listPredictions({ ...range, status: "done", limit: SAMPLE }),
      ]);
      setStats(s);
      setTimes(recent.results.map((r) => r.processing_ms).filter((v): v is number => typeof v === "number"));
    } catch (e) {
      setError(e);
      setStats(null);
    }
  }, []);

  useEffect(() => { void load("", ""); }, [load]);

  const submit = (event: FormEvent) => {
    event.preventDefault();
    void load(since, until);
  };

  const verdicts = stats?.by_prediction ?? {};
  const media = stats?.by_media_type ?? {};
  return (
    <section aria-labelledby="stats-title">
      <h1 id="stats-title">Statistics</h1>
      <form className="filters" onSubmit={submit} aria-label="Date range">
        <div>
          <label htmlFor={`${id}-since`}>From</label>
          <input id={`${id}-since`} type="date" value={since} onChange={(e) => setSince(e.target.value)} />
        </div>
        <div>
          <label htmlFor={`${id}-until`}>To</label>
          <input id={`${id}-until`} type="date" value={until} onChange={(e) => setUntil(e.target.value)} />
        </div>
        <div className="filter-actions"><button type="submit">Show</button></div>
      </form>
      {error != null && <ErrorMessage error={error} context="Could not load the statistics" />}
      {stats && (
        <div className="stats">
          <p className="big-number" data-testid="stats-total"><strong>{stats.total ?? 0}</strong> predictions</p>
          <BarChart title="Predictions per day" testId="chart-per-day"
                    bars={(stats.per_day ?? []).map((d) => ({ label: (d.date ?? "").slice(5), value: d.count ?? 0 }))} />
          <SplitBar title="Verdicts" testId="chart-verdicts"
                    parts={["fake", "real"].map((k) => ({ label: k, value: verdicts[k] ?? 0 }))} />
          <SplitBar title="Media types" testId="chart-media"
                    parts={Object.entries(media).map(([label, value]) => ({ label, value }))} />
          <p>
            Processing time: mean <strong>{stats.processing_ms?.mean != null ? `${stats.processing_ms.mean.toFixed(0)} ms` : "–"}</strong>,
            95th percentile <strong>{stats.processing_ms?.p95 != null ? `${stats.processing_ms.p95.toFixed(0)} ms` : "–"}</strong>.
          </p>
          <BarChart title={`Processing times of the newest ${times.length} results (ms)`} testId="chart-times"
                    bars={histogram(times)} />
        </div>
      )}
    </section>
  );
}
