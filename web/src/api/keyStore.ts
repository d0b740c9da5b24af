// The API key lives in this tab's session storage only: never in localStorage, never in a cookie,
// and it is gone when the tab closes.
const KEY_NAME = "d3.apiKey";

export function getApiKey(): string {
  try {
    return sessionStorage.getItem(KEY_NAME) ?? "";
  } catch {
    return ""; // storage disabled: the page still works without a key
  }
}

export function setApiKey(key: string): void {
  const trimmed = key.trim();
  try {
    if (trimmed) sessionStorage.setItem(KEY_NAME, trimmed);
    else sessionStorage.removeItem(KEY_NAME);
  } catch {
    /* storage disabled: nothing to keep */
  }
}

export function authHeaders(): Record<string, string> {
  const key = getApiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}
