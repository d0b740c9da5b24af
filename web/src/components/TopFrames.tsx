import { useEffect, useState } from "react";
import { formatProbability, formatSeconds } from "../media";

export interface FrameRef {
  timestamp_s: number;
  fake_probability: number;
  index?: number;
}

const THUMB_WIDTH = 160;
const STEP_TIMEOUT_MS = 5000;

function once(target: HTMLMediaElement, name: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => done(new Error(`timed out waiting for ${name}`)), STEP_TIMEOUT_MS);
    const ok = () => done();
    const fail = () => done(new Error("the browser cannot decode this video"));
    function done(error?: Error) {
      clearTimeout(timer);
      target.removeEventListener(name, ok);
      target.removeEventListener("error", fail);
      if (error) reject(error);
      else resolve();
    }
    target.addEventListener(name, ok);
    target.addEventListener("error", fail);
  });
}

/** Thumbnails of the given moments, drawn from the user's own file in this browser (nothing uploaded again). */
export async function captureFrames(source: string, times: number[]): Promise<string[]> {
  const video = document.createElement("video");
  video.muted = true;
  video.preload = "auto";
  video.playsInline = true;
  const loaded = once(video, "loadeddata");
  video.src = source;
  await loaded;
  const canvas = document.createElement("canvas");
  const scale = THUMB_WIDTH / (video.videoWidth || THUMB_WIDTH);
  canvas.width = THUMB_WIDTH;
  canvas.height = Math.max(1, Math.round((video.videoHeight || THUMB_WIDTH * 0.5625) * scale));
  const context = canvas.getContext("2d");
  if (!context) throw new Error("no 2D canvas");
  const images: string[] = [];
  for (const t of times) {
    const seeked = once(video, "seeked");
    video.currentTime = Math.min(Math.max(t, 0), Math.max((video.duration || t) - 0.001, 0));
    await seeked;
    context.drawImage(video, 0, 0, canvas.width, canvas.height);
    images.push(canvas.toDataURL("image/jpeg", 0.85));
  }
  video.removeAttribute("src");
  video.load();
  return images;
}

/** The most suspicious frames: thumbnails when the browser can decode the file, buttons that seek the player. */
export function TopFrames({ frames, source, onSeek }: { frames: FrameRef[]; source: string | null; onSeek?: (t: number) => void }) {
  const [images, setImages] = useState<string[] | null>(null);
  const [problem, setProblem] = useState<string | null>(null);
  const key = frames.map((f) => f.timestamp_s).join(",");

  useEffect(() => {
    let cancelled = false;
    setImages(null);
    setProblem(null);
    if (!source || frames.length === 0) return;
    captureFrames(source, frames.map((f) => f.timestamp_s))
      .then((result) => { if (!cancelled) setImages(result); })
      .catch((error: Error) => { if (!cancelled) setProblem(error.message); });
    return () => { cancelled = true; };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [source, key]);

  if (frames.length === 0) return null;
  return (
    <div>
      <ul className="top-frames" aria-label="Most suspicious frames" data-testid="top-frames">
        {frames.map((f, i) => {
          const caption = `${formatSeconds(f.timestamp_s)} · p ${formatProbability(f.fake_probability)}`;
          const content = (
            <>
              {images?.[i] ? (
                <img src={images[i]} alt={`Frame at ${formatSeconds(f.timestamp_s)}`} data-testid="top-frame-image" />
              ) : (
                <span className="thumb-placeholder" aria-hidden="true" />
              )}
              <span className="thumb-caption">{caption}</span>
            </>
          );
          return (
            <li key={i}>
              {onSeek ? (
                <button type="button" className="thumb" onClick={() => onSeek(f.timestamp_s)}
                        aria-label={`Jump to ${caption}`}>{content}</button>
              ) : (
                <div className="thumb">{content}</div>
              )}
            </li>
          );
        })}
      </ul>
      {problem && source && <p className="muted">No thumbnails: {problem}.</p>}
    </div>
  );
}
