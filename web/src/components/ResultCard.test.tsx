import { render, screen, within } from "@testing-library/react";
import { describe, expect, it } from "vitest";
import type { AnyPrediction } from "../api/client";
import { ResultCard } from "./ResultCard";

const base = {
  id: "6f1c1c8e-0000-4000-8000-000000000000", status: "done", threshold: 0.5, model_version: "d3/tiny",
  sha256: "a".repeat(64), created_at: "2026-12-01T10:00:00Z", size_bytes: 2048,
} as const;

describe("ResultCard", () => {
  it("says the verdict in words, the probability against the threshold, and the demo caution", () => {
    render(<ResultCard result={{ ...base, media_type: "image", filename: "cat.png", prediction: "fake",
                                 fake_probability: 0.8123, warning: "model has random (untrained) weights" } as AnyPrediction} />);
    expect(screen.getByTestId("verdict")).toHaveTextContent("Likely AI-generated (fake)");
    expect(screen.getByTestId("probability")).toHaveTextContent("0.812");
    expect(screen.getByTestId("threshold")).toHaveTextContent("0.5");
    expect(screen.getByTestId("caution")).toHaveTextContent("untrained");
    expect(screen.queryByTestId("timeline")).toBeNull(); // an image has no timeline
  });

  it("shows no caution for a trained model", () => {
    render(<ResultCard result={{ ...base, media_type: "image", prediction: "real", fake_probability: 0.1 } as AnyPrediction} />);
    expect(screen.getByTestId("verdict")).toHaveTextContent("Likely real");
    expect(screen.queryByTestId("caution")).toBeNull();
  });

  it("draws an audio clip's windows on the timeline, with an audio player and the fake stretches", () => {
    const result = {
      ...base, media_type: "audio", filename: "voice.wav", prediction: "fake", fake_probability: 0.7, duration_s: 6,
      windows: [
        { index: 0, start_s: 0, end_s: 4, fake_probability: 0.2 },
        { index: 1, start_s: 2, end_s: 6, fake_probability: 0.9 },
      ],
      segments: [{ start_s: 2, end_s: 6, mean_probability: 0.9, max_probability: 0.9 }],
    } as unknown as AnyPrediction;
    const { container } = render(<ResultCard result={result} source="blob:voice" />);
    expect(container.querySelector("audio")).not.toBeNull();
    expect(container.querySelector("video")).toBeNull();
    expect(screen.getAllByTestId("timeline-point")).toHaveLength(2);
    expect(screen.getAllByTestId("timeline-segment")).toHaveLength(1);
    expect(within(screen.getByTestId("segments")).getByRole("button")).toHaveTextContent("2.00 s – 6.00 s");
  });

  it("lists a text's chunks", () => {
    const result = { ...base, media_type: "text", prediction: "real", fake_probability: 0.3,
                     chunks: [{ start_token: 0, end_token: 128, scored_tokens: 127, criterion: 0.42 }] } as unknown as AnyPrediction;
    render(<ResultCard result={result} />);
    expect(screen.getByTestId("chunks")).toHaveTextContent("tokens 0–128: criterion 0.420");
  });

  it("shows what the metadata claims beside the verdict, never in it", () => {
    const provenance = {
      c2pa: { present: true, status: "tampered", claim_generator: "ImageMaker/2.1", signer: { issuer: "Example Corp" } },
      iptc_digital_source_type: { code: "trainedAlgorithmicMedia", uri: "x", label: "Trained algorithmic media" },
      declared_ai: true, declared_ai_source: "c2pa", notes: [],
    };
    render(<ResultCard result={{ ...base, media_type: "image", prediction: "real", fake_probability: 0.2,
                                 provenance } as unknown as AnyPrediction} />);
    expect(screen.getByTestId("verdict")).toHaveTextContent("Likely real");
    expect(screen.getByTestId("declared")).toHaveTextContent("made with generative AI (in its C2PA manifest)");
    expect(screen.getByTestId("c2pa")).toHaveTextContent("tampered");
    expect(screen.getByTestId("c2pa")).toHaveTextContent("signed by Example Corp");
    expect(screen.getByTestId("source-type")).toHaveTextContent("Trained algorithmic media");
  });

  it("says when a file carries no metadata claim", () => {
    const provenance = { c2pa: { present: false }, iptc_digital_source_type: null, declared_ai: null,
                         declared_ai_source: null, notes: [] };
    render(<ResultCard result={{ ...base, media_type: "image", prediction: "real", fake_probability: 0.2,
                                 provenance } as unknown as AnyPrediction} />);
    expect(screen.getByTestId("declared")).toHaveTextContent("makes no claim");
    expect(screen.getByTestId("c2pa")).toHaveTextContent("no Content Credentials");
  });
});
