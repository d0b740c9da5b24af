import { formatProbability, formatSeconds, type TimelineSegment } from "../media";

export function SegmentList({ segments, onSeek }: { segments: TimelineSegment[]; onSeek?: (t: number) => void }) {
  if (segments.length === 0) {
    return <p className="muted" data-testid="segments-none">No stretch scored over the threshold.</p>;
  }
  return (
    <ol className="segments" aria-label="Stretches scored as fake" data-testid="segments">
      {segments.map((s, i) => (
        <li key={i}>
          {onSeek ? (
            <button type="button" className="link" onClick={() => onSeek(s.start)}>
              {formatSeconds(s.start)} – {formatSeconds(s.end)}
            </button>
          ) : (
            <span>{formatSeconds(s.start)} – {formatSeconds(s.end)}</span>
          )}
          <span className="muted">
            {" "}mean {formatProbability(s.mean)}, max {formatProbability(s.max)}
          </span>
        </li>
      ))}
    </ol>
  );
}
