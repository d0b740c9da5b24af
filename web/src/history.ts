import type { ListQuery, Prediction } from "./api/client";

export interface HistoryFilters {
  prediction: "" | NonNullable<Prediction["prediction"]>;
  media_type: "" | NonNullable<ListQuery["media_type"]>;
  since: string; // yyyy-mm-dd from a date input, the user's local day
  until: string;
  min_probability: string;
  max_probability: string;
  filename: string;
}

export const EMPTY_FILTERS: HistoryFilters = {
  prediction: "", media_type: "", since: "", until: "", min_probability: "", max_probability: "", filename: "",
};

type MediaFilter = NonNullable<ListQuery["media_type"]>;
/** Every media_type GET /predictions accepts, with its label. A Record over the generated enum: when
 * the API gains a media type (audio, text), the build fails until it is listed here. */
const MEDIA_LABELS: Record<MediaFilter, string> = { image: "images", video: "videos" };
export const MEDIA_TYPES = Object.entries(MEDIA_LABELS).map(([value, label]) => ({ value: value as MediaFilter, label }));
export const PAGE_SIZES = [10, 25, 50, 100] as const;

/** A local calendar day's start (or end) as an ISO 8601 instant. */
export function dayBoundary(day: string, end: boolean): string | undefined {
  if (!/^\d{4}-\d{2}-\d{2}$/.test(day)) return undefined;
  const date = new Date(`${day}T${end ? "23:59:59.999" : "00:00:00.000"}`);
  return Number.isNaN(date.getTime()) ? undefined : date.toISOString();
}

function probability(raw: string): number | undefined {
  if (raw.trim() === "") return undefined;
  const value = Number(raw);
  return Number.isFinite(value) ? value : undefined;
}

/** The GET /predictions query for these filters, one page of `limit`, from `cursor` (none: the first page). */
export function buildListQuery(filters: HistoryFilters, limit: number, cursor: string | null): ListQuery {
  const query: ListQuery = { limit };
  if (filters.prediction) query.prediction = filters.prediction;
  if (filters.media_type) query.media_type = filters.media_type;
  const since = dayBoundary(filters.since, false);
  const until = dayBoundary(filters.until, true);
  if (since) query.since = since;
  if (until) query.until = until;
  const min = probability(filters.min_probability);
  const max = probability(filters.max_probability);
  if (min !== undefined) query.min_probability = min;
  if (max !== undefined) query.max_probability = max;
  if (filters.filename.trim()) query.filename = filters.filename.trim();
  if (cursor) query.cursor = cursor;
  return query;
}
