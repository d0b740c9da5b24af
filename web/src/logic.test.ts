import { describe, expect, it } from "vitest";
import { parseRoute } from "./App";
import type { AnyPrediction } from "./api/client";
import { histogram } from "./components/Charts";
import { buildListQuery, EMPTY_FILTERS } from "./history";
import { kindOf, timelineOf } from "./media";

const base = { id: "00000000-0000-0000-0000-000000000001", status: "done", threshold: 0.5, model_version: "m",
               sha256: "0".repeat(64), created_at: "2026-12-01T10:00:00Z" } as const;

describe("buildListQuery", () => {
  it("sends only the filters that are set, as GET /predictions names them", () => {
    expect(buildListQuery(EMPTY_FILTERS, 10, null)).toEqual({ limit: 10 });
    const query = buildListQuery({ ...EMPTY_FILTERS, prediction: "fake", media_type: "video", min_probability: "0.8",
                                   max_probability: "", filename: " clip ", since: "2026-11-01", until: "2026-11-30" },
                                 25, "abc");
    expect(query).toMatchObject({ limit: 25, prediction: "fake", media_type: "video", min_probability: 0.8,
                                  filename: "clip", cursor: "abc" });
    expect(query.max_probability).toBeUndefined();
    // local days, as instants: the start of the first, the end of the last
    expect(new Date(query.since!).getTime()).toBe(new Date("2026-11-01T00:00:00").getTime());
    expect(new Date(query.until!).getTime()).toBe(new Date("2026-11-30T23:59:59.999").getTime());
  });
});

describe("media", () => {
  it("sends a file to the endpoint of its type, by MIME type then extension", () => {
    expect(kindOf({ name: "a.bin", type: "image/png" })).toBe("image");
    expect(kindOf({ name: "clip.MKV", type: "" })).toBe("video");
    expect(kindOf({ name: "voice.flac", type: "" })).toBe("audio");
    expect(kindOf({ name: "notes.txt", type: "text/plain" })).toBe("unknown");
  });

  it("reads a video's frames and an audio clip's windows as one timeline", () => {
    const video = timelineOf({ ...base, media_type: "video", duration_s: 10,
      frames: [{ index: 5, timestamp_s: 2, fake_probability: 0.7 }, { index: 1, timestamp_s: 0.5, fake_probability: 0.1 }],
      segments: [{ start_s: 1.5, end_s: 2.5, mean_probability: 0.7, max_probability: 0.7 }] } as AnyPrediction)!;
    expect(video.points.map((p) => p.t)).toEqual([0.5, 2]); // in time order
    expect(video.duration).toBe(10);
    expect(video.segments).toEqual([{ start: 1.5, end: 2.5, mean: 0.7, max: 0.7 }]);
    const audio = timelineOf({ ...base, media_type: "image",
      windows: [{ start_s: 0, end_s: 2, fake_probability: 0.3 }, { start_s: 2, end_s: 4, fake_probability: 0.6 }] } as AnyPrediction)!;
    expect(audio.unit).toBe("window");
    expect(audio.points.map((p) => p.t)).toEqual([1, 3]);
    expect(audio.duration).toBe(4);
    expect(timelineOf({ ...base, media_type: "image" } as AnyPrediction)).toBeNull();
  });
});

describe("histogram and routes", () => {
  it("bins every value once", () => {
    const bars = histogram([1, 2, 3, 10, 10], 5);
    expect(bars).toHaveLength(5);
    expect(bars.reduce((s, b) => s + b.value, 0)).toBe(5);
    expect(bars[4].value).toBe(2); // the largest value lands in the last bin
    expect(histogram([])).toEqual([]);
  });

  it("parses hash routes", () => {
    expect(parseRoute("")).toEqual({ page: "check" });
    expect(parseRoute("#/history")).toEqual({ page: "history" });
    expect(parseRoute("#/history/abc")).toEqual({ page: "detail", id: "abc" });
    expect(parseRoute("#/stats")).toEqual({ page: "stats" });
  });
});
