import { fireEvent, render, screen } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { describe, expect, it, vi } from "vitest";
import type { TimelineData } from "../media";
import { Timeline } from "./Timeline";

const data: TimelineData = {
  unit: "frame",
  duration: 4,
  points: [
    { index: 0, t: 0.5, p: 0.2 },
    { index: 1, t: 1.5, p: 0.9 },
    { index: 2, t: 2.5, p: 0.8 },
    { index: 3, t: 3.5, p: 0.1 },
  ],
  segments: [{ start: 1, end: 3, mean: 0.85, max: 0.9 }],
};

describe("Timeline", () => {
  it("draws one point per frame, the shaded segments and the threshold", () => {
    render(<Timeline data={data} threshold={0.5} />);
    expect(screen.getAllByTestId("timeline-point")).toHaveLength(4);
    const segments = screen.getAllByTestId("timeline-segment");
    expect(segments).toHaveLength(1);
    // x = 46 + t / 4 * 740: the segment spans 1 s..3 s
    expect(Number(segments[0].getAttribute("x"))).toBeCloseTo(46 + 185);
    expect(Number(segments[0].getAttribute("width"))).toBeCloseTo(370);
    const threshold = screen.getByTestId("timeline-threshold");
    expect(Number(threshold.getAttribute("y1"))).toBeCloseTo(14 + 0.5 * 192);
    // points over the threshold are marked, not only by colour: the readout says so too
    expect(screen.getAllByTestId("timeline-point").filter((c) => c.classList.contains("over"))).toHaveLength(2);
  });

  it("reads and seeks with the keyboard", async () => {
    const onSeek = vi.fn();
    render(<Timeline data={data} threshold={0.5} onSeek={onSeek} />);
    const slider = screen.getByRole("slider");
    slider.focus();
    await userEvent.keyboard("{Home}{ArrowRight}");
    expect(screen.getByTestId("timeline-readout")).toHaveTextContent("1.50 s: fake probability 0.900 (over the threshold 0.5)");
    expect(slider).toHaveAttribute("aria-valuenow", "1.5");
    await userEvent.keyboard("{End}{Enter}");
    expect(onSeek).toHaveBeenCalledWith(3.5);
  });

  it("hover shows the nearest point's time and score, click seeks there", () => {
    const onSeek = vi.fn();
    render(<Timeline data={data} threshold={0.5} onSeek={onSeek} />);
    const svg = screen.getByTestId("timeline");
    // The drawing is 800 units wide; lay it out 800 px wide at the origin.
    svg.getBoundingClientRect = () => ({ left: 0, top: 0, width: 800, height: 240, right: 800, bottom: 240, x: 0, y: 0, toJSON: () => ({}) });
    const xOf = (t: number) => 46 + (t / 4) * 740;
    fireEvent.pointerMove(svg, { clientX: xOf(2.4) });
    expect(screen.getByTestId("timeline-tooltip")).toHaveTextContent("2.50 s");
    expect(screen.getByTestId("timeline-tooltip")).toHaveTextContent("p = 0.800");
    fireEvent.click(svg, { clientX: xOf(0.7) });
    expect(onSeek).toHaveBeenCalledWith(0.5);
    fireEvent.pointerLeave(svg);
    expect(screen.queryByTestId("timeline-tooltip")).toBeNull();
  });
});
