import { formatProbability } from "../media";

/** The fake probability as a bar with the threshold marked: fake when the bar passes the mark. */
export function ProbabilityMeter({ probability, threshold }: { probability: number; threshold: number }) {
  const W = 300;
  const fill = Math.min(Math.max(probability, 0), 1) * W;
  const mark = Math.min(Math.max(threshold, 0), 1) * W;
  return (
    <svg viewBox={`0 0 ${W} 26`} className="meter" role="img"
         aria-label={`fake probability ${formatProbability(probability)}, threshold ${threshold}`}>
      <rect x={0} y={6} width={W} height={14} rx={3} className="meter-track" />
      <rect x={0} y={6} width={fill} height={14} rx={3} className={probability > threshold ? "meter-fill fake" : "meter-fill real"} />
      <line x1={mark} x2={mark} y1={0} y2={26} className="meter-mark" />
    </svg>
  );
}
