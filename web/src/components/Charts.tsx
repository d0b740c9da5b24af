// Small SVG charts drawn here rather than with a chart library: three chart shapes with labelled
// axes and a data table each, under a strict CSP (no inline styles, which several libraries set),
// for a few kilobytes instead of a few hundred.

export interface Bar {
  label: string;
  value: number;
}

const W = 640;
const H = 220;
const M = { left: 40, right: 10, top: 12, bottom: 46 };

function niceMax(value: number): number {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  const steps = [1, 2, 2.5, 5, 10];
  return (steps.find((s) => s * power >= value) ?? 10) * power;
}

/** Vertical bars with a y axis, and the numbers in a table for screen readers. */
export function BarChart({ bars, title, unit = "", testId }: { bars: Bar[]; title: string; unit?: string; testId?: string }) {
  const max = niceMax(Math.max(0, ...bars.map((b) => b.value)));
  const plotW = W - M.left - M.right;
  const plotH = H - M.top - M.bottom;
  const slot = plotW / Math.max(bars.length, 1);
  const every = Math.max(1, Math.ceil(bars.length / 6)); // at most ~6 x labels: they must not overlap
  return (
    <figure className="chart" data-testid={testId}>
      <figcaption>{title}</figcaption>
      <svg viewBox={`0 0 ${W} ${H}`} role="img" aria-label={`${title}: ${bars.map((b) => `${b.label} ${b.value}${unit}`).join(", ")}`}>
        {[0, 0.5, 1].map((f) => (
          <g key={f}>
            <line x1={M.left} x2={W - M.right} y1={M.top + plotH * (1 - f)} y2={M.top + plotH * (1 - f)} className="chart-grid" />
            <text x={M.left - 6} y={M.top + plotH * (1 - f) + 4} textAnchor="end" className="chart-axis">
              {Number((max * f).toPrecision(3))}
            </text>
          </g>
        ))}
        {bars.map((b, i) => {
          const h = (b.value / max) * plotH;
          return (
            <g key={b.label}>
              <rect data-testid="chart-bar" className="chart-bar" x={M.left + i * slot + slot * 0.15} y={M.top + plotH - h}
                    width={slot * 0.7} height={Math.max(h, 0)}>
                <title>{`${b.label}: ${b.value}${unit}`}</title>
              </rect>
              {i % every === 0 && (
                <text x={M.left + i * slot + slot / 2} y={H - M.bottom + 16} textAnchor="middle" className="chart-axis">{b.label}</text>
              )}
            </g>
          );
        })}
      </svg>
      <DataTable bars={bars} title={title} unit={unit} />
    </figure>
  );
}

/** One horizontal bar split into shares (verdicts, media types), with a legend that says the numbers. */
export function SplitBar({ parts, title, testId }: { parts: Bar[]; title: string; testId?: string }) {
  const total = parts.reduce((s, p) => s + p.value, 0);
  let x = 0;
  return (
    <figure className="chart" data-testid={testId}>
      <figcaption>{title}</figcaption>
      <svg viewBox="0 0 640 36" role="img" aria-label={`${title}: ${parts.map((p) => `${p.label} ${p.value}`).join(", ")}`}>
        {total === 0 && <rect x={0} y={4} width={640} height={28} className="chart-empty" />}
        {parts.map((p, i) => {
          const w = total ? (p.value / total) * 640 : 0;
          const rect = <rect key={p.label} x={x} y={4} width={w} height={28} className={`split split-${i} split-${p.label}`} />;
          x += w;
          return rect;
        })}
      </svg>
      <ul className="legend">
        {parts.map((p, i) => (
          <li key={p.label}>
            <span className={`swatch split-${i} split-${p.label}`} aria-hidden="true" />
            {p.label}: {p.value}{total ? ` (${Math.round((p.value / total) * 100)}%)` : ""}
          </li>
        ))}
      </ul>
    </figure>
  );
}

function DataTable({ bars, title, unit }: { bars: Bar[]; title: string; unit: string }) {
  return (
    <details className="chart-data">
      <summary>Numbers</summary>
      <table>
        <caption className="visually-hidden">{title}</caption>
        <tbody>
          {bars.map((b) => <tr key={b.label}><th scope="row">{b.label}</th><td>{b.value}{unit}</td></tr>)}
        </tbody>
      </table>
    </details>
  );
}

/** Counts of values in equal-width bins between 0 and the largest value. */
export function histogram(values: number[], bins = 10): Bar[] {
  if (values.length === 0) return [];
  const top = Math.max(...values);
  const width = top > 0 ? top / bins : 1;
  const counts = new Array<number>(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor(v / width))] += 1;
  return counts.map((value, i) => ({ label: `${Math.round(i * width)}–${Math.round((i + 1) * width)}`, value }));
}
