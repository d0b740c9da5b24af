import { useId, useState, type FormEvent } from "react";
import { getApiKey, setApiKey } from "../api/keyStore";

/** The API key, kept in this tab's session storage only and sent as `Authorization: Bearer`. */
export function KeyField({ onChange }: { onChange?: (hasKey: boolean) => void }) {
  const [draft, setDraft] = useState(getApiKey());
  const [saved, setSaved] = useState(getApiKey() !== "");
  const [shown, setShown] = useState(false);
  const inputId = useId();
  const hintId = useId();

  const save = (event: FormEvent) => {
    event.preventDefault();
    setApiKey(draft);
    const has = draft.trim() !== "";
    setSaved(has);
    onChange?.(has);
  };
  const forget = () => {
    setApiKey("");
    setDraft("");
    setSaved(false);
    onChange?.(false);
  };

  return (
    <form className="key-field" onSubmit={save} aria-label="API key settings">
      <label htmlFor={inputId}>API key</label>
      <input
        id={inputId}
        type={shown ? "text" : "password"}
        autoComplete="off"
        spellCheck={false}
        placeholder="d3_<id>_<secret>"
        value={draft}
        onChange={(e) => setDraft(e.target.value)}
        aria-describedby={hintId}
      />
      <button type="button" className="secondary" onClick={() => setShown(!shown)} aria-pressed={shown}>
        {shown ? "Hide" : "Show"}
      </button>
      <button type="submit">Use key</button>
      {saved && <button type="button" className="secondary" onClick={forget}>Forget</button>}
      <span id={hintId} className="hint" aria-live="polite">
        {saved ? "Key set for this tab (session storage only)." : "No key: only works where the service allows anonymous use."}
      </span>
    </form>
  );
}
