import type { AnyPrediction } from "./api/client";

export type FileKind = "image" | "video" | "audio" | "unknown";

const EXTENSIONS: Record<string, FileKind> = {
  jpg: "image", jpeg: "image", png: "image", webp: "image", bmp: "image", gif: "image", tif: "image", tiff: "image",
  mp4: "video", m4v: "video", mov: "video", avi: "video", webm: "video", mkv: "video", ts: "video", mpg: "video",
  mpeg: "video", flv: "video", ogv: "video", wmv: "video", asf: "video",
  wav: "audio", mp3: "audio", flac: "audio", ogg: "audio", oga: "audio", m4a: "audio", aac: "audio", opus: "audio",
};

/** Which endpoint a file goes to: its MIME type, else its extension. The service reads the content anyway. */
export function kindOf(file: { name: string; type: string }): FileKind {
  const major = file.type.split("/")[0];
  if (major === "image" || major === "video" || major === "audio") return major;
  const extension = file.name.toLowerCase().split(".").pop() ?? "";
  return EXTENSIONS[extension] ?? "unknown";
}

export interface TimelinePoint {
  index: number;
  t: number;
  p: number;
}

export interface TimelineSegment {
  start: number;
  end: number;
  mean: number | null;
  max: number | null;
}

export interface TimelineData {
  points: TimelinePoint[];
  segments: TimelineSegment[];
  duration: number;
  unit: "frame" | "window";
}

/** The per-frame (video) or per-window (audio) scores of a result, or null when it has none. */
export function timelineOf(result: AnyPrediction): TimelineData | null {
  let points: TimelinePoint[] = [];
  let unit: TimelineData["unit"] = "frame";
  if (result.frames && result.frames.length > 0) {
    points = result.frames.map((f, i) => ({ index: f.index ?? i, t: f.timestamp_s, p: f.fake_probability }));
  } else if (result.windows && result.windows.length > 0) {
    unit = "window";
    points = result.windows.map((w, i) => ({
      index: w.index ?? i,
      t: w.timestamp_s ?? (w.end_s != null ? (w.start_s + w.end_s) / 2 : w.start_s),
      p: w.fake_probability,
    }));
  }
  if (points.length === 0) return null;
  points.sort((a, b) => a.t - b.t);
  const segments = (result.segments ?? []).map((s) => ({
    start: s.start_s ?? 0,
    end: s.end_s ?? s.start_s ?? 0,
    mean: s.mean_probability ?? null,
    max: s.max_probability ?? null,
  }));
  const lastWindowEnd = result.windows?.reduce((m, w) => Math.max(m, w.end_s ?? w.start_s), 0) ?? 0;
  const duration = Math.max(result.duration_s ?? 0, lastWindowEnd, points[points.length - 1].t,
                            ...segments.map((s) => s.end), 0.001);
  return { points, segments, duration, unit };
}

export function formatSeconds(seconds: number): string {
  if (!Number.isFinite(seconds)) return "–";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  const minutes = Math.floor(seconds / 60);
  const rest = seconds - minutes * 60;
  return `${minutes}:${rest.toFixed(1).padStart(4, "0")}`;
}

export function formatProbability(p: number | null | undefined): string {
  return p == null ? "–" : p.toFixed(3);
}

export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}
