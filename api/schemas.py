"""Request and response schemas (pydantic): each endpoint's one schema parses its request and
generates its part of the OpenAPI document (api/openapi.py, through spectree).

Limits that are settings (MAX_VIDEO_FRAMES, MAX_BATCH_FILES, DEFAULT_THRESHOLD, ...) are not
written here: a field names the setting in `json_schema_extra` (`x-d3-default`, `x-d3-maximum`,
`x-d3-max-items`) and api/openapi.py puts the app's value in the document; the services enforce
them. Every field has a default or an example that makes a working request as sent, so Swagger
UI's "Try it out" works unchanged (tests/test_api_openapi.py sends exactly that).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError
from werkzeug.datastructures import FileStorage

from api.services.queries import DEFAULT_LIMIT, MAX_LIMIT, MAX_OFFSET
from api.services.videos import MAX_SAMPLE_FPS

PROBABILITY = {"ge": 0.0, "le": 1.0, "allow_inf_nan": False}


def _one_file(value: Any) -> FileStorage:
    if isinstance(value, list):  # the part was repeated: the first one counts, as Werkzeug's .get() does
        value = value[0] if value else None
    if not isinstance(value, FileStorage):
        raise ValueError("must be a file part (a multipart field with a filename)")
    return value


def _file_list(value: Any) -> list[FileStorage]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, FileStorage) for v in values):
        raise ValueError("every part must be a file (a multipart field with a filename)")
    return values


BINARY = {"type": "string", "format": "binary"}
UploadedFile = Annotated[FileStorage, BeforeValidator(_one_file), WithJsonSchema(BINARY)]
UploadedFiles = Annotated[list[FileStorage], BeforeValidator(_file_list),
                          WithJsonSchema({"type": "array", "items": BINARY})]


class Params(BaseModel):
    """Base of the request models: unknown fields are ignored and an empty value means "not given"."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                # No text of this API means anything with a NUL in it, and PostgreSQL refuses to store one.
                if isinstance(value, str) and "\x00" in value:
                    raise PydanticCustomError("nul", "must not contain NUL characters", {"parameter": name})
            return {k: v for k, v in data.items() if not (isinstance(v, str) and v.strip() == "")}
        return data


# -- shared fields -------------------------------------------------------------------------------
def threshold_field() -> Any:
    return Field(None, **PROBABILITY, json_schema_extra={"x-d3-default": "default_threshold"},
                 description="Decision threshold: the verdict is fake when fake_probability > threshold. "
                             "Default DEFAULT_THRESHOLD.")


REUSE_DESCRIPTION = ("Return the stored result when these exact bytes were already scored with this model "
                     "version and threshold by this caller (the response then says reused: true). "
                     "false always runs the model and stores a new record.")


# -- POST /predict, /predict/batch ---------------------------------------------------------------
# Parameters are documented as query parameters (they may also be sent as form fields: see
# api/openapi.py), the multipart body holds only the files. That is also what makes Swagger UI's
# "Try it out" right: it prefills every property of a form body, but only the defaults of query
# parameters.
class ImageParams(Params):
    threshold: float | None = threshold_field()
    reuse: bool = Field(True, description=REUSE_DESCRIPTION)


class ImageFile(Params):
    file: UploadedFile = Field(description="The image: JPEG, PNG, WebP, BMP, GIF or TIFF, told by its content.")


class ImageFiles(Params):
    files: UploadedFiles = Field(description="The images, one part each (repeat the field), at most MAX_BATCH_FILES.",
                                 json_schema_extra={"x-d3-max-items": "max_batch_files"})


# -- POST /predict/video -------------------------------------------------------------------------
class VideoParams(Params):
    threshold: float | None = threshold_field()
    frames: int | None = Field(None, ge=1, json_schema_extra={"x-d3-maximum": "max_video_frames"}, description=(
        "Frames to sample (default DEFAULT_VIDEO_FRAMES, at most MAX_VIDEO_FRAMES): the centre frame of each "
        "of n equal slices, index_i = floor((i + 0.5) * frame_count / n). Not with fps."))
    fps: float | None = Field(None, gt=0, le=MAX_SAMPLE_FPS, allow_inf_nan=False, description=(
        "Sample rate instead of a count: floor(duration * fps) frames (at least 1, capped at "
        "MAX_VIDEO_FRAMES), placed the same way. Not with frames."))
    aggregation: Literal["mean", "vote", "max"] = Field("mean", description=(
        "mean of frame probabilities, vote = share of frames over the threshold, or max; the verdict is "
        "fake when it exceeds the threshold."))
    run_async: bool = Field(False, alias="async", description=(
        "Queue a job and answer 202 at once. Also automatic above VIDEO_ASYNC_BYTES or VIDEO_ASYNC_SECONDS."))
    callback_url: str | None = Field(None, max_length=2000, json_schema_extra={"format": "uri"}, description=(
        "POSTed the final result (the GET /predictions/{id} body) when the job ends, with retries. https only "
        "unless CALLBACK_ALLOW_HTTP; hosts that resolve to private, loopback, link-local or reserved addresses "
        "are refused unless CALLBACK_ALLOW_PRIVATE. Implies async."))
    audio: bool = Field(False, description=(
        "Also score the soundtrack with the speech detector (AASIST): the answer gets an `audio` member with "
        "its own verdict (a separate audio prediction of the same upload; queued as an audio job when the video "
        "is). When the soundtrack cannot be scored (no audio track, speech detector unavailable) `audio` holds "
        "that error and its status_code; the frames' verdict stands."))


class VideoFile(Params):
    file: UploadedFile = Field(description=(
        "The video. Its type is read from the content (MP4/MOV, AVI, WebM/Matroska, MPEG-TS/PS, FLV, Ogg, "
        "ASF), never from the filename."))


# -- GET /predictions, /predictions/stats -----------------------------------------------------------
def _utc(value: datetime | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return (value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value).astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last datetime once in UTC
        raise PydanticCustomError("range", "is outside the dates this API can compare (years 1 to 9999 in UTC)",
                                  {"parameter": name}) from None


class TimeRange(Params):
    since: datetime | None = Field(None, description="Created at or after (ISO 8601 date or date-time, UTC if no "
                                                     "offset).")
    until: datetime | None = Field(None, description="Created at or before (ISO 8601).")

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        self.since, self.until = _utc(self.since, "since"), _utc(self.until, "until")
        if self.since and self.until and self.since > self.until:
            raise PydanticCustomError("range", "since must not be after until", {"parameter": "since"})
        return self


class PredictionQuery(TimeRange):
    prediction: Literal["fake", "real"] | None = Field(None, description="Only this verdict.")
    media_type: Literal["image", "video", "audio", "text"] | None = Field(None, description="Only this media type.")
    status: Literal["queued", "running", "done", "failed"] | None = Field(None, description="Only this status.")
    min_probability: float | None = Field(None, **PROBABILITY, description="Minimum fake probability.")
    max_probability: float | None = Field(None, **PROBABILITY, description="Maximum fake probability.")
    sha256: str | None = Field(None, pattern="^[0-9a-fA-F]{64}$", description="Exact SHA-256 of the input.")
    filename: str | None = Field(None, max_length=255, description="Substring of the filename (case-insensitive).")
    declared_ai: Literal["true", "false", "unknown"] | None = Field(None, description=(
        "What the file's metadata claims (docs/PROVENANCE.md): generative AI, not, or no claim."))
    c2pa: bool | None = Field(None, description="Whether a C2PA manifest was present.")
    limit: int | None = Field(None, ge=1, le=MAX_LIMIT, json_schema_extra={"example": DEFAULT_LIMIT},
                              description=f"Page size (default {DEFAULT_LIMIT}; with a cursor, the cursor's).")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="Rows to skip (ignored with cursor).")
    cursor: str | None = Field(None, max_length=2048, description=(
        "Opaque cursor from next_cursor: it carries the filters and limit of its listing (send it alone; a "
        "different filter or limit is a 400); overrides offset."))

    @model_validator(mode="after")
    def _probabilities(self) -> PredictionQuery:
        if (self.min_probability is not None and self.max_probability is not None
                and self.min_probability > self.max_probability):
            raise PydanticCustomError("range", "min_probability must not exceed max_probability",
                                      {"parameter": "min_probability"})
        return self


class ObjectLink(Params):
    """The proof a signed /objects link carries (api/storage.py signs it)."""

    # Not constrained here: a bad, expired or missing proof is a 404 like a missing object (nothing to probe).
    expires: str | None = Field(None, description="Unix time the link expires at (from the link).")
    signature: str | None = Field(None, description="HMAC-SHA256 of bucket, key and expires (from the link).")
# -- POST /predict/audio -------------------------------------------------------------------------
class AudioParams(Params):
    threshold: float | None = threshold_field()
    aggregation: Literal["mean", "vote", "max"] = Field("mean", description=(
        "mean of the windows' fake probabilities, vote = share of windows over the threshold, or max; the "
        "verdict is fake when it exceeds the threshold."))
    run_async: bool = Field(False, alias="async", description=(
        "Queue a job and answer 202 at once. Also automatic above AUDIO_ASYNC_SECONDS."))


class AudioFile(Params):
    file: UploadedFile = Field(description=(
        "The recording: WAV, FLAC, Ogg (Opus, Vorbis), MP3, AAC or M4A, or a video whose first audio track is "
        "scored; told by its content, never the filename. Decoded to 16 kHz mono."))


# -- POST /predict/text --------------------------------------------------------------------------
TEXT_EXAMPLE = ("The committee met on Tuesday to review the budget and, after a long discussion about the roads "
                "and the library opening hours, decided to postpone the vote until the spring meeting.")


class TextParams(Params):
    threshold: float | None = threshold_field()


class TextBody(Params):
    text: str = Field(min_length=1, examples=[TEXT_EXAMPLE], description=(
        "The text, scored as it is (no cleaning). At least TEXT_MIN_TOKENS tokens of the scoring model's "
        "tokenizer, at most TEXT_MAX_CHARS characters and TEXT_MAX_TOKENS tokens."))
    threshold: float | None = threshold_field()


class TextFile(Params):
    file: UploadedFile = Field(description="A UTF-8 text file (at most MAX_TEXT_BYTES), instead of a JSON body.")


# -- responses -----------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="Stable machine-readable name, e.g. invalid_input, unavailable.")
    message: str = Field(description="What went wrong, for people.")
    parameter: str | None = Field(None, description="The request parameter at fault, when there is one.")


class ErrorBody(BaseModel):
    """Every error: {"error": {"code", "message", ...}}."""

    error: ErrorDetail


class SourceType(BaseModel):
    """An IPTC digital source type (cv.iptc.org/newscodes/digitalsourcetype)."""

    code: str
    uri: str
    label: str | None = None
    declares_ai: bool | None = Field(None, description="true: generative AI; false: another known origin.")


class C2paReport(BaseModel):
    """The active C2PA manifest as the C2PA library validated it (docs/PROVENANCE.md)."""

    model_config = ConfigDict(extra="allow")

    present: bool
    status: Literal["trusted", "untrusted", "tampered", "invalid", "error"] | None = None
    validation_state: str | None = None
    claim_generator: str | None = None
    actions: list[dict[str, Any]] | None = None
    signer: dict[str, Any] | None = None
    ingredients: int | None = None
    error: str | None = None


class Provenance(BaseModel):
    """What the file's own metadata claims, reported beside the verdict and never mixed into it."""

    c2pa: C2paReport
    iptc_digital_source_type: SourceType | None = None
    declared_ai: bool | None = Field(None, description="What the metadata claims: generative AI, not, or no claim.")
    declared_ai_source: Literal["c2pa", "xmp"] | None = None
    notes: list[str] = Field(default_factory=list)


class Prediction(BaseModel):
    """One stored prediction (image, video, audio or text)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="UUID of the record.")
    media_type: Literal["image", "video", "audio", "text"]
    status: Literal["queued", "running", "done", "failed"]
    prediction: Literal["fake", "real"] | None = None
    fake_probability: float | None = Field(None, ge=0, le=1)
    confidence: float | None = Field(None, ge=0, le=1)
    threshold: float = Field(ge=0, le=1)
    model_version: str
    sha256: str
    filename: str | None = None
    size_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    processing_ms: float | None = None
    created_at: str = Field(description="ISO 8601, UTC.")
    result_url: str | None = Field(None, description="Signed, expiring link to the stored result JSON.")
    reused: bool | None = Field(None, description=(
        "true: the stored record of an earlier request with the same bytes, threshold and model version, "
        "returned without a new analysis (same id and created_at); send reuse=false to analyse again. "
        "false: a new analysis."))
    notes: list[str] | None = Field(None, description=(
        "What was done that the sender may not expect: a reused result, EXIF orientation ignored (the "
        "pixels are scored as stored, as in the authors' evaluation), a 16-bit image scaled to 8 bits."))
    warning: str | None = Field(None, description="Present while the model has random (untrained) weights.")
    error: str | None = None
    provenance: Provenance | None = Field(None, description=(
        "C2PA and IPTC metadata claims. The verdict ignores them. Null for records made before they were read."))


class BatchError(BaseModel):
    index: int
    filename: str | None = None
    status: int = Field(description="The HTTP status this file alone would have had.")
    error: ErrorDetail


class BatchEntry(Prediction):
    index: int = Field(description="Position of the file in the request.")


class BatchResult(BaseModel):
    count: int
    succeeded: int
    failed: int
    results: list[BatchEntry | BatchError] = Field(description="One entry per file, in order.")


class VideoFrame(BaseModel):
    index: int = Field(description="Frame number in the video (0-based, decoding order).")
    timestamp_s: float = Field(description="index / fps.")
    fake_probability: float = Field(ge=0, le=1)


class VideoSegment(BaseModel):
    start_s: float = Field(description="Start of the first frame's slice of the video.")
    end_s: float = Field(description="End of the last frame's slice of the video.")
    start_frame: int
    end_frame: int
    first_timestamp_s: float
    last_timestamp_s: float
    frames: int = Field(description="Sampled frames in the run.")
    mean_probability: float = Field(ge=0, le=1)
    max_probability: float = Field(ge=0, le=1)


class Aggregates(BaseModel):
    mean: float = Field(ge=0, le=1)
    vote: float = Field(ge=0, le=1)
    max: float = Field(ge=0, le=1)


class Progress(BaseModel):
    done: int
    total: int


class Callback(BaseModel):
    url: str
    status: str


class VideoPrediction(Prediction):
    """A video prediction: while queued/running only progress; once done, everything."""

    aggregation: Literal["mean", "vote", "max"] | None = None
    aggregates: Aggregates | None = Field(None, description="All three, whatever was chosen.")
    frames_analyzed: int | None = None
    duration_s: float | None = None
    fps: float | None = None
    frame_count: int | None = None
    codec: str | None = None
    container: str | None = None
    sampling: dict[str, Any] | None = Field(
        None, description="mode (frames|fps), requested_frames, planned_frames, capped, rule.")
    decoding: dict[str, Any] | None = Field(None, description="strategy, seeks, grabs, skipped_frames, decode_s.")
    progress: Progress | None = None
    top_frames: list[VideoFrame] | None = Field(None, description="The 5 most suspicious frames, highest first.")
    segments: list[VideoSegment] | None = Field(None, description="Runs of consecutive sampled frames over the "
                                                                  "threshold.")
    frames: list[VideoFrame] | None = None
    timeline_url: str | None = Field(None, description="Signed link to the timeline PNG (like result_url).")
    timings_ms: dict[str, float] | None = Field(None, description="probe, decode, preprocess, inference (sync only).")
    status_url: str | None = Field(None, description="Async only: poll it (GET /predictions/{id}).")
    callback: Callback | None = None


class PredictionList(BaseModel):
    total: int = Field(description="Records matching the filters.")
    count: int = Field(description="Records on this page.")
    limit: int
    offset: int | None = Field(None, description="null when paging by cursor.")
    next_cursor: str | None = Field(None, description="Pass as cursor for the next page; null on the last one.")
    results: list[Prediction]


class DayCount(BaseModel):
    date: str
    count: int


class ProcessingTimes(BaseModel):
    mean: float | None = None
    p95: float | None = None


class Stats(BaseModel):
    since: str
    until: str
    total: int
    by_prediction: dict[str, int]
    by_media_type: dict[str, int]
    by_status: dict[str, int]
    by_declared_ai: dict[str, int] | None = Field(None, description="true, false, unknown (no claim).")
    c2pa_present: int | None = Field(None, description="Records whose file carried a C2PA manifest.")
    per_day: list[DayCount]
    mean_fake_probability: float | None = None
    processing_ms: ProcessingTimes


class Health(BaseModel):
    """Without a key (when keys are required) only status and ready."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "unavailable"]
    ready: bool
    model: dict[str, Any] | None = None
    database: dict[str, Any] | None = None
    object_store: dict[str, Any] | None = None
    queue_depth: int | None = None
    warning: str | None = None
class AudioWindow(BaseModel):
    index: int = Field(description="Window number (0-based).")
    start_s: float
    end_s: float
    score: float = Field(description="AASIST's bona fide logit (the authors' score): higher = more bona fide.")
    fake_probability: float = Field(ge=0, le=1, description="sigmoid(-score).")


class AudioSegment(BaseModel):
    start_s: float = Field(description="Start of the run's first window.")
    end_s: float = Field(description="End of the run's last window.")
    start_window: int
    end_window: int
    windows: int = Field(description="Windows in the run.")
    mean_probability: float = Field(ge=0, le=1)
    max_probability: float = Field(ge=0, le=1)


class AudioTopWindow(BaseModel):
    index: int
    start_s: float
    end_s: float
    fake_probability: float = Field(ge=0, le=1)


class AudioPrediction(Prediction):
    """A speech prediction: every 4.0375 s window scored by AASIST, aggregated like video frames."""

    aggregation: Literal["mean", "vote", "max"] | None = None
    aggregates: Aggregates | None = None
    windows_analyzed: int | None = None
    duration_s: float | None = None
    container: str | None = None
    codec: str | None = None
    audio: dict[str, Any] | None = Field(None, description="Decoding facts: channels, source sample rate, samples.")
    window: dict[str, Any] | None = Field(None, description="samples (64,600), seconds, hop_s, sample_rate.")
    score_meaning: str | None = None
    progress: Progress | None = None
    top_windows: list[AudioTopWindow] | None = None
    segments: list[AudioSegment] | None = Field(None, description="Runs of consecutive windows over the threshold.")
    windows: list[AudioWindow] | None = None
    timeline_url: str | None = None
    timings_ms: dict[str, float] | None = None
    status_url: str | None = None


class TextChunk(BaseModel):
    start_token: int
    end_token: int
    scored_tokens: int
    criterion: float


class TextPrediction(Prediction):
    """A text prediction: Fast-DetectGPT's criterion and the authors' display probability."""

    criterion: float | None = Field(None, description="Analytic sampling discrepancy: higher = more machine-like. "
                                                      "Rank texts by it.")
    criterion_meaning: str | None = None
    calibration: str | None = Field(None, description="The model pair whose constants map criterion to "
                                                      "fake_probability (not monotone).")
    characters: int | None = None
    tokens: int | None = None
    scored_tokens: int | None = None
    chunks: list[TextChunk] | None = Field(None, description="Chunks of a text longer than the models' context "
                                                             "(overlapping by one token); sums pooled.")


class AnyPrediction(RootModel[VideoPrediction | AudioPrediction | TextPrediction]):
    """One stored prediction of any kind: an image's or a video's (VideoPrediction), a recording's or a text's."""


class VideoWithAudio(VideoPrediction):
    audio: AudioPrediction | dict[str, Any] | None = Field(
        None, description="With audio=true: the soundtrack's own prediction, or {status_code, error}.")


# -- model versions: GET /models, GET /models/active, PUT /models/active, POST /models ----------------
class ModelCardSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    created_at: str | None = Field(None, description="When `d3 train` wrote the card.")
    threshold: float | None = Field(None, description="The default threshold (chosen by `d3 calibrate`).")
    validation: dict[str, Any] | None = Field(None, description="Validation AP and accuracy of the trained head.")
    validation_start: dict[str, Any] | None = Field(None, description="The same for the head training started from.")
    calibration: dict[str, Any] | None = None


class ModelVersionInfo(BaseModel):
    version: str = Field(description="The version's id: its head's sha256:<12 hex>, as in every model_version.")
    name: str | None = None
    sha256: str
    size_bytes: int
    created_at: str | None
    active: bool = Field(description="The version the database says answers now.")
    threshold: float | None = Field(None, description="Default threshold from its card (null: DEFAULT_THRESHOLD).")
    card: ModelCardSummary | None = None


class ModelVersionList(BaseModel):
    active: str | None = Field(description="The active version's id; null: the configured head (D3_HEAD_WEIGHTS).")
    versions: list[ModelVersionInfo]


class ActiveModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str | None = Field(description="The id of the version answering in this process (null: the "
                                            "configured head).")
    model_version: str = Field(description="What predictions scored now record as model_version.")
    trained: bool
    threshold: float = Field(description="The default threshold of a request that sends none.")
    threshold_source: Literal["card", "settings"]
    source: Literal["configured", "model_versions"]
    database: dict[str, Any] | None = Field(None, description="The database's active row (serving processes follow "
                                                             "it within MODEL_VERSION_POLL_S).")
    poll: dict[str, Any] | None = Field(None, description="This process's last read of the active version: poll_s, "
                                                         "polled_at (Unix time), poll_error.")


class ActivateModel(Params):
    version: str | None = Field(None, examples=["sha256:0123456789ab"], description=(
        "The version to activate: its id, name or a unique sha256 prefix (or send default: true instead)."))
    default: bool = Field(False, description="true: activate the configured head (D3_HEAD_WEIGHTS).")


class ModelUploadParams(Params):
    name: str | None = Field(None, description="A unique name for the version (letters, digits, . _ -).")


class ModelUpload(Params):
    head: UploadedFile = Field(description="The head checkpoint: the authors' plain state_dict (.pth).")
    card: UploadedFile | None = Field(None, description="Its model card (d3-model-card/1 JSON), optional.")
