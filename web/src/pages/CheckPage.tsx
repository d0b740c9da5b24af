import { useEffect, useId, useRef, useState, type DragEvent, type FormEvent } from "react";
import {
  predictAudio, predictBatch, predictImage, predictText, predictVideo, waitForJob,
  type AnyPrediction, type BatchItem, type Uploaded, type UploadProgress,
} from "../api/client";
import { ApiError, toApiError } from "../api/errors";
import { ErrorMessage } from "../components/ErrorMessage";
import { ResultCard } from "../components/ResultCard";
import { formatBytes, kindOf, type FileKind } from "../media";

interface Item {
  key: string;
  name: string;
  kind: FileKind | "text";
  phase: "uploading" | "queued" | "running" | "done" | "error";
  upload: UploadProgress | null;
  job: { done: number; total: number } | null;
  result: AnyPrediction | null;
  error: unknown;
  warning: string | null;
  source: string | null;
}

let counter = 0;
const nextKey = () => `item-${++counter}`;

export function CheckPage() {
  const [files, setFiles] = useState<File[]>([]);
  const [text, setText] = useState("");
  const [threshold, setThreshold] = useState("0.5");
  const [runAsync, setRunAsync] = useState(false);
  const [dragging, setDragging] = useState(false);
  const [items, setItems] = useState<Item[]>([]);
  const [busy, setBusy] = useState(false);
  const [formError, setFormError] = useState<string | null>(null);
  const inputRef = useRef<HTMLInputElement>(null);
  const sources = useRef<string[]>([]);
  const ids = { files: useId(), hint: useId(), text: useId(), threshold: useId(), async: useId() };

  useEffect(() => () => sources.current.forEach((url) => URL.revokeObjectURL(url)), []);

  const update = (key: string, change: Partial<Item>) =>
    setItems((all) => all.map((item) => (item.key === key ? { ...item, ...change } : item)));

  const addFiles = (list: FileList | File[] | null) => {
    if (!list) return;
    setFiles((current) => [...current, ...Array.from(list)]);
  };

  const onDrop = (event: DragEvent) => {
    event.preventDefault();
    setDragging(false);
    addFiles(event.dataTransfer.files);
  };

  const parsedThreshold = (): number | null => {
    const value = Number(threshold);
    return threshold.trim() !== "" && Number.isFinite(value) && value >= 0 && value <= 1 ? value : null;
  };

  const newItem = (name: string, kind: Item["kind"], source: string | null = null): Item => ({
    key: nextKey(), name, kind, phase: "uploading", upload: null, job: null, result: null, error: null,
    warning: null, source,
  });

  const finish = async (item: Item, answer: Uploaded<AnyPrediction>) => {
    const body = answer.body;
    if (answer.status === 202 || body.status === "queued" || body.status === "running") {
      update(item.key, { phase: body.status === "running" ? "running" : "queued", result: body, warning: answer.warning,
                         job: body.progress ? { done: body.progress.done ?? 0, total: body.progress.total ?? 0 } : null });
      const final = await waitForJob(body.id, (current) => update(item.key, {
        phase: current.status === "running" ? "running" : current.status === "queued" ? "queued" : "done",
        job: current.progress ? { done: current.progress.done ?? 0, total: current.progress.total ?? 0 } : null,
        result: current,
      }));
      update(item.key, { phase: final.status === "failed" ? "error" : "done", result: final,
                         error: final.status === "failed" ? new ApiError(422, "job_failed", final.error ?? "the job failed") : null });
    } else {
      update(item.key, { phase: "done", result: body, warning: answer.warning });
    }
  };

  const runMedia = async (file: File, kind: "video" | "audio", value: number) => {
    const source = URL.createObjectURL(file);
    sources.current.push(source);
    const item = newItem(file.name, kind, source);
    setItems((all) => [item, ...all]);
    try {
      const send = kind === "video" ? predictVideo : predictAudio;
      const answer = await send(file, value, runAsync, (upload) => update(item.key, { upload }));
      await finish(item, answer);
    } catch (error) {
      const unsupported = kind === "audio" && error instanceof ApiError && (error.status === 404 || error.status === 405);
      update(item.key, { phase: "error", error: unsupported ? new ApiError(404, "no_audio", "this service does not analyse audio files") : error });
    }
  };

  const runImages = async (images: File[], value: number) => {
    const group = images.map((f) => newItem(f.name, "image"));
    setItems((all) => [...group, ...all]);
    const progress = (upload: UploadProgress) => group.forEach((item) => update(item.key, { upload }));
    try {
      if (images.length === 1) {
        const answer = await predictImage(images[0], value, progress);
        update(group[0].key, { phase: "done", result: answer.body, warning: answer.warning });
        return;
      }
      const answer = await predictBatch(images, value, progress);
      answer.body.results.forEach((entry: BatchItem, i: number) => {
        const item = group[i];
        if (!item) return;
        if ("error" in entry && typeof entry.error === "object" && typeof entry.status === "number") {
          update(item.key, { phase: "error", error: toApiError(entry.status, entry, null) });
        } else {
          update(item.key, { phase: "done", result: entry as AnyPrediction, warning: answer.warning });
        }
      });
    } catch (error) {
      group.forEach((item) => update(item.key, { phase: "error", error }));
    }
  };

  const runText = async (value: number) => {
    const item = newItem(text.slice(0, 40) + (text.length > 40 ? "…" : ""), "text");
    setItems((all) => [item, ...all]);
    try {
      await finish(item, await predictText(text, value));
    } catch (error) {
      const unsupported = error instanceof ApiError && (error.status === 404 || error.status === 405);
      update(item.key, { phase: "error", error: unsupported ? new ApiError(404, "no_text", "this service does not analyse text") : error });
    }
  };

  const submit = async (event: FormEvent) => {
    event.preventDefault();
    const value = parsedThreshold();
    if (value == null) {
      setFormError("The threshold must be a number from 0 to 1.");
      return;
    }
    if (files.length === 0 && text.trim() === "") {
      setFormError("Choose or drop at least one file, or paste a text.");
      return;
    }
    setFormError(null);
    setBusy(true);
    const chosen = files;
    setFiles([]);
    if (inputRef.current) inputRef.current.value = "";
    try {
      const images = chosen.filter((f) => kindOf(f) === "image");
      const unknown = chosen.filter((f) => kindOf(f) === "unknown");
      // Files whose type the browser cannot tell go to the image endpoint: the service reads the content.
      const tasks: Promise<void>[] = [];
      if (images.length + unknown.length > 0) tasks.push(runImages([...images, ...unknown], value));
      for (const file of chosen) {
        const kind = kindOf(file);
        if (kind === "video" || kind === "audio") tasks.push(runMedia(file, kind, value));
      }
      if (text.trim() !== "") tasks.push(runText(value));
      await Promise.all(tasks);
    } finally {
      setBusy(false);
    }
  };

  return (
    <section aria-labelledby="check-title">
      <h1 id="check-title">Check a file</h1>
      <form className="check-form" onSubmit={submit} noValidate>
        <div
          className={dragging ? "dropzone dragging" : "dropzone"}
          onDragOver={(e) => { e.preventDefault(); setDragging(true); }}
          onDragLeave={() => setDragging(false)}
          onDrop={onDrop}
          data-testid="dropzone"
        >
          <label htmlFor={ids.files}>Images, a video or an audio file</label>
          <p id={ids.hint} className="hint">Drop files here, or choose them. Several images go in one request.</p>
          <input ref={inputRef} id={ids.files} type="file" multiple accept="image/*,video/*,audio/*"
                 aria-describedby={ids.hint} onChange={(e) => addFiles(e.target.files)} />
        </div>
        {files.length > 0 && (
          <ul className="chosen" aria-label="Chosen files">
            {files.map((file, i) => (
              <li key={`${file.name}-${i}`}>
                <span>{file.name} <span className="muted">({kindOf(file)}, {formatBytes(file.size)})</span></span>
                <button type="button" className="link" onClick={() => setFiles(files.filter((_, j) => j !== i))}
                        aria-label={`Remove ${file.name}`}>Remove</button>
              </li>
            ))}
          </ul>
        )}
        <label htmlFor={ids.text}>Or paste a text</label>
        <textarea id={ids.text} rows={4} value={text} onChange={(e) => setText(e.target.value)}
                  placeholder="Paste a passage to check whether it was machine-written" />
        <div className="options">
          <div>
            <label htmlFor={ids.threshold}>Threshold</label>
            <input id={ids.threshold} type="number" inputMode="decimal" min={0} max={1} step={0.05}
                   value={threshold} onChange={(e) => setThreshold(e.target.value)} />
          </div>
          <div className="checkbox">
            <input id={ids.async} type="checkbox" checked={runAsync} onChange={(e) => setRunAsync(e.target.checked)} />
            <label htmlFor={ids.async}>Videos and audio as a background job (live progress)</label>
          </div>
          <button type="submit" disabled={busy}>{busy ? "Checking…" : "Check"}</button>
        </div>
        {formError && <p className="error" role="alert">{formError}</p>}
      </form>

      <div className="results" aria-live="polite">
        {items.map((item) => (
          <div key={item.key} className="result-slot" data-testid="result-slot" data-phase={item.phase}>
            {item.phase === "uploading" && (
              <div className="progress">
                <label>
                  Uploading {item.name}
                  <progress max={item.upload?.total || 1} value={item.upload ? item.upload.loaded : 0}
                            data-testid="upload-progress" />
                </label>
              </div>
            )}
            {(item.phase === "queued" || item.phase === "running") && (
              <div className="progress" data-testid="job-progress">
                <label>
                  {item.name}: {item.phase === "queued" ? "waiting for a worker" : "analysing"}
                  {item.job && item.job.total > 0 ? ` (${item.job.done} of ${item.job.total} frames)` : ""}
                  <progress max={item.job?.total || 1} value={item.job?.done ?? 0} />
                </label>
              </div>
            )}
            {item.phase === "error" && <ErrorMessage error={item.error} context={item.name} />}
            {item.phase === "done" && item.result && (
              <ResultCard result={item.result} source={item.source} warning={item.warning} />
            )}
          </div>
        ))}
      </div>
    </section>
  );
}
