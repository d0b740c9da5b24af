import { useRef } from "react";
import type { AnyPrediction } from "../api/client";
import { formatBytes, formatProbability, formatSeconds, timelineOf } from "../media";
import { ProbabilityMeter } from "./ProbabilityMeter";
import { ProvenanceFacts } from "./ProvenanceFacts";
import { SegmentList } from "./SegmentList";
import { Timeline } from "./Timeline";
import { TopFrames } from "./TopFrames";

export const UNTRAINED_CAUTION =
  "Caution: this service runs a demo model with random, untrained weights. Its verdicts are meaningless: do not rely on them.";

interface Props {
  result: AnyPrediction;
  /** An object URL of the user's own file (video/audio): the player and the thumbnails use it. */
  source?: string | null;
  warning?: string | null;
  headingLevel?: 2 | 3;
}

export function isUntrained(result: AnyPrediction, warning?: string | null): boolean {
  const text = `${result.warning ?? ""} ${warning ?? ""}`.toLowerCase();
  return text.includes("untrained") || text.includes("random");
}

export function ResultCard({ result, source = null, warning = null, headingLevel = 2 }: Props) {
  const playerRef = useRef<HTMLVideoElement & HTMLAudioElement>(null);
  const Heading = headingLevel === 2 ? "h2" : "h3";
  const Sub = headingLevel === 2 ? "h3" : "h4";
  const timeline = timelineOf(result);
  const seek = (t: number) => {
    const player = playerRef.current;
    if (!player) return;
    player.currentTime = t; // no focus(): it would scroll the page away from the timeline
  };
  const p = result.fake_probability ?? null;
  const verdict = result.prediction ?? null;
  const isAudio = result.media_type === ("audio" as string);

  return (
    <article className="result" data-testid="result" aria-labelledby={`r-${result.id}`}>
      <Heading id={`r-${result.id}`} className="result-title">
        {result.filename || `${result.media_type} ${result.id.slice(0, 8)}`}
      </Heading>
      {isUntrained(result, warning) && (
        <p className="caution" role="note" data-testid="caution">{UNTRAINED_CAUTION}</p>
      )}
      {result.status !== "done" ? (
        <p data-testid="status">Status: {result.status}{result.error ? ` (${result.error})` : ""}</p>
      ) : (
        <div className="verdict-row">
          <span className={`verdict ${verdict ?? ""}`} data-testid="verdict">
            {verdict === "fake" ? "Likely AI-generated (fake)" : verdict === "real" ? "Likely real" : "No verdict"}
          </span>
          {p != null && (
            <div className="probability">
              <p>
                Fake probability <strong data-testid="probability">{formatProbability(p)}</strong>,
                threshold <strong data-testid="threshold">{result.threshold}</strong>{" "}
                <span className="muted">(fake when above)</span>
              </p>
              <ProbabilityMeter probability={p} threshold={result.threshold} />
            </div>
          )}
        </div>
      )}
      <dl className="facts">
        <dt>Model</dt><dd data-testid="model-version">{result.model_version}</dd>
        <dt>Media</dt><dd>{result.media_type}{result.size_bytes != null ? `, ${formatBytes(result.size_bytes)}` : ""}
          {result.width && result.height ? `, ${result.width}×${result.height}` : ""}
          {result.duration_s ? `, ${formatSeconds(result.duration_s)}` : ""}</dd>
        {result.processing_ms != null && <><dt>Processing</dt><dd>{result.processing_ms.toFixed(0)} ms</dd></>}
        {result.reused && <><dt>Reused</dt><dd>an earlier result for the same file</dd></>}
        {result.frames_analyzed != null && <><dt>Frames analysed</dt><dd>{result.frames_analyzed} ({result.aggregation})</dd></>}
        <dt>Record</dt><dd><a href={`#/history/${result.id}`}>{result.id}</a></dd>
      </dl>
      <ProvenanceFacts provenance={result.provenance} heading={Sub} />
      {timeline && (
        <section className="media-detail" aria-label="Timeline">
          {source && (isAudio
            ? <audio ref={playerRef} controls src={source} className="player" data-testid="player" />
            : <video ref={playerRef} controls muted src={source} className="player" data-testid="player" />)}
          <Timeline data={timeline} threshold={result.threshold} onSeek={source ? seek : undefined} />
          {!isAudio && result.top_frames && result.top_frames.length > 0 && (
            <>
              <Sub>Most suspicious frames</Sub>
              <TopFrames frames={result.top_frames} source={source} onSeek={source ? seek : undefined} />
            </>
          )}
          <Sub>Stretches over the threshold</Sub>
          <SegmentList segments={timeline.segments} onSeek={source ? seek : undefined} />
        </section>
      )}
      {result.chunks && result.chunks.length > 0 && (
        <section aria-label="Scores per passage">
          <Sub>Scores per passage</Sub>
          <ol className="chunks" data-testid="chunks">
            {result.chunks.map((c, i) => (
              <li key={i} className={c.fake_probability != null && c.fake_probability > result.threshold ? "over" : ""}>
                {c.start_token != null && <span className="muted">tokens {c.start_token}–{c.end_token ?? "?"}: </span>}
                {c.fake_probability != null && <span>p {formatProbability(c.fake_probability)} </span>}
                {c.criterion != null && <span>criterion {c.criterion.toFixed(3)} </span>}
                {c.text ?? ""}
              </li>
            ))}
          </ol>
        </section>
      )}
    </article>
  );
}
