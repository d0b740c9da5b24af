import { useEffect, useState } from "react";
import { getHealth } from "./api/client";
import { KeyField } from "./components/KeyField";
import { UNTRAINED_CAUTION } from "./components/ResultCard";
import { CheckPage } from "./pages/CheckPage";
import { DetailPage } from "./pages/DetailPage";
import { HistoryPage } from "./pages/HistoryPage";
import { StatsPage } from "./pages/StatsPage";

export type Route = { page: "check" } | { page: "history" } | { page: "detail"; id: string } | { page: "stats" };

// Hash routes (#/history, #/history/<id>): the page works from any static server with no rewrites,
// and three routes need no router library.
export function parseRoute(hash: string): Route {
  const parts = hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  if (parts[0] === "history" && parts[1]) return { page: "detail", id: decodeURIComponent(parts[1]) };
  if (parts[0] === "history") return { page: "history" };
  if (parts[0] === "stats") return { page: "stats" };
  return { page: "check" };
}

function useRoute(): Route {
  const [route, setRoute] = useState(() => parseRoute(window.location.hash));
  useEffect(() => {
    const onChange = () => setRoute(parseRoute(window.location.hash));
    window.addEventListener("hashchange", onChange);
    return () => window.removeEventListener("hashchange", onChange);
  }, []);
  return route;
}

const NAV: { href: string; label: string; pages: Route["page"][] }[] = [
  { href: "#/check", label: "Check", pages: ["check"] },
  { href: "#/history", label: "History", pages: ["history", "detail"] },
  { href: "#/stats", label: "Stats", pages: ["stats"] },
];

export function App() {
  const route = useRoute();
  const [keyVersion, setKeyVersion] = useState(0);
  const [untrained, setUntrained] = useState(false);

  useEffect(() => {
    // The public part of /health; with a key, also whether the model is trained.
    getHealth().then((h) => setUntrained(h?.model != null && (h.model as { trained?: boolean }).trained === false), () => {});
  }, [keyVersion]);

  useEffect(() => {
    document.getElementById("main")?.focus();
  }, [route.page]);

  return (
    <>
      <a href="#main" className="skip-link">Skip to the content</a>
      <header className="site-header">
        <div className="brand">
          <span className="logo" aria-hidden="true">D3</span>
          <span>Deepfake Detection</span>
        </div>
        <nav aria-label="Main">
          <ul>
            {NAV.map((item) => (
              <li key={item.href}>
                <a href={item.href} aria-current={item.pages.includes(route.page) ? "page" : undefined}>{item.label}</a>
              </li>
            ))}
          </ul>
        </nav>
        <KeyField onChange={() => setKeyVersion((v) => v + 1)} />
        {untrained && <p className="banner caution" role="note" data-testid="banner-untrained">{UNTRAINED_CAUTION}</p>}
      </header>
      <main id="main" tabIndex={-1} key={keyVersion}>
        {route.page === "check" && <CheckPage />}
        {route.page === "history" && <HistoryPage />}
        {route.page === "detail" && <DetailPage id={route.id} />}
        {route.page === "stats" && <StatsPage />}
      </main>
      <footer className="site-footer">
        <a href="../docs/">API documentation</a> · Uses the public API only; your key stays in this tab.
      </footer>
    </>
  );
}
