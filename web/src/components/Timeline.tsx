import { useId, useRef, useState, type KeyboardEvent, type MouseEvent, type PointerEvent } from "react";
import { formatProbability, formatSeconds, type TimelineData } from "../media";

// Drawn here in SVG rather than with a chart library: it needs a custom interaction (hover to read,
// click or Enter to seek the player, arrow keys to step) and shaded segments, in ~150 lines.
const W = 800;
const H = 240;
const M = { left: 46, right: 14, top: 14, bottom: 34 };
const PLOT_W = W - M.left - M.right;
const PLOT_H = H - M.top - M.bottom;

interface Props {
  data: TimelineData;
  threshold: number;
  /** Jump the player to this time (seconds). */
  onSeek?: (seconds: number) => void;
  label?: string;
}

export function Timeline({ data, threshold, onSeek, label }: Props) {
  const { points, segments, duration, unit } = data;
  const [active, setActive] = useState<number | null>(null);
  const svgRef = useRef<SVGSVGElement>(null);
  const descriptionId = useId();
  const x = (t: number) => M.left + (Math.min(Math.max(t, 0), duration) / duration) * PLOT_W;
  const y = (p: number) => M.top + (1 - Math.min(Math.max(p, 0), 1)) * PLOT_H;

  const nearest = (t: number) => {
    let best = 0;
    for (let i = 1; i < points.length; i++) {
      if (Math.abs(points[i].t - t) < Math.abs(points[best].t - t)) best = i;
    }
    return best;
  };

  const timeAtPointer = (event: { clientX: number }): number | null => {
    const box = svgRef.current?.getBoundingClientRect();
    if (!box || box.width <= 0) return null;
    const viewX = ((event.clientX - box.left) / box.width) * W;
    return ((viewX - M.left) / PLOT_W) * duration;
  };

  const onPointerMove = (event: PointerEvent<SVGSVGElement>) => {
    const t = timeAtPointer(event);
    if (t != null) setActive(nearest(t));
  };

  const onClick = (event: MouseEvent<SVGSVGElement>) => {
    // The point under the click itself, not the last hovered one: a touch has no hover.
    const t = timeAtPointer(event);
    const index = t != null ? nearest(t) : active;
    setActive(index);
    seek(index);
  };

  const seek = (index: number | null) => {
    if (index != null && onSeek) onSeek(points[index].t);
  };

  const onKeyDown = (event: KeyboardEvent<SVGSVGElement>) => {
    const current = active ?? 0;
    const moves: Record<string, number> = {
      ArrowRight: current + 1, ArrowUp: current + 1, ArrowLeft: current - 1, ArrowDown: current - 1,
      Home: 0, End: points.length - 1, PageUp: current + 10, PageDown: current - 10,
    };
    if (event.key in moves) {
      event.preventDefault();
      setActive(Math.min(Math.max(moves[event.key], 0), points.length - 1));
    } else if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      seek(current);
    }
  };

  const line = points.map((pt) => `${x(pt.t).toFixed(1)},${y(pt.p).toFixed(1)}`).join(" ");
  const point = active != null ? points[active] : null;
  const over = point ? point.p > threshold : false;
  const readout = point
    ? `${formatSeconds(point.t)}: fake probability ${formatProbability(point.p)} (${over ? "over" : "not over"} the threshold ${threshold})`
    : `Hover, or focus and use the arrow keys, to read each ${unit}'s score${onSeek ? "; click or press Enter to jump the player there" : ""}.`;
  const xTicks = Array.from({ length: 6 }, (_, i) => (duration * i) / 5);
  const tooltipX = point ? Math.min(x(point.t) + 8, W - M.right - 150) : 0;

  return (
    <figure className="timeline">
      <svg
        ref={svgRef}
        viewBox={`0 0 ${W} ${H}`}
        className="timeline-svg"
        role="slider"
        tabIndex={0}
        aria-label={label ?? `Fake probability per ${unit} over time`}
        aria-describedby={descriptionId}
        aria-valuemin={0}
        aria-valuemax={Number(duration.toFixed(3))}
        aria-valuenow={point ? Number(point.t.toFixed(3)) : 0}
        aria-valuetext={point ? readout : "no point selected"}
        onPointerMove={onPointerMove}
        onPointerLeave={() => setActive(null)}
        onClick={onClick}
        onKeyDown={onKeyDown}
        data-testid="timeline"
      >
        <rect x={M.left} y={M.top} width={PLOT_W} height={PLOT_H} className="timeline-bg" />
        {segments.map((s, i) => (
          <rect key={i} data-testid="timeline-segment" className="timeline-segment"
                x={x(s.start)} y={M.top} width={Math.max(x(s.end) - x(s.start), 2)} height={PLOT_H} />
        ))}
        {[0, 0.25, 0.5, 0.75, 1].map((p) => (
          <g key={p}>
            <line x1={M.left} x2={W - M.right} y1={y(p)} y2={y(p)} className="timeline-grid" />
            <text x={M.left - 6} y={y(p) + 4} className="timeline-axis" textAnchor="end">{p.toFixed(2)}</text>
          </g>
        ))}
        {xTicks.map((t, i) => (
          <text key={i} x={x(t)} y={H - 12} className="timeline-axis"
                textAnchor={i === 0 ? "start" : i === xTicks.length - 1 ? "end" : "middle"}>{formatSeconds(t)}</text>
        ))}
        <line x1={M.left} x2={W - M.right} y1={y(threshold)} y2={y(threshold)} className="timeline-threshold"
              data-testid="timeline-threshold" />
        <text x={W - M.right - 4} y={y(threshold) - 5} className="timeline-axis" textAnchor="end">threshold {threshold}</text>
        <polyline points={line} className="timeline-line" />
        {points.map((pt, i) => (
          <circle key={i} data-testid="timeline-point" cx={x(pt.t)} cy={y(pt.p)} r={i === active ? 6 : 3.5}
                  className={pt.p > threshold ? "timeline-point over" : "timeline-point"} />
        ))}
        {point && (
          <g className="timeline-tooltip" data-testid="timeline-tooltip">
            <line x1={x(point.t)} x2={x(point.t)} y1={M.top} y2={M.top + PLOT_H} className="timeline-cursor" />
            <rect x={tooltipX} y={M.top + 4} width={150} height={40} rx={4} />
            <text x={tooltipX + 8} y={M.top + 20}>{formatSeconds(point.t)}</text>
            <text x={tooltipX + 8} y={M.top + 37}>p = {formatProbability(point.p)}</text>
          </g>
        )}
      </svg>
      <figcaption id={descriptionId} className="timeline-readout" aria-live="polite" data-testid="timeline-readout">
        {readout}
      </figcaption>
    </figure>
  );
}
