/// <reference types="vitest/config" />
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// Relative asset paths: the same bundle works under the app's /ui/ and at an nginx pod's root.
export default defineConfig({
  base: "./",
  plugins: [react()],
  build: {
    outDir: "dist",
    emptyOutDir: true,
    // No inline <script> or data: URLs in the page: it must run under a strict CSP.
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    sourcemap: false,
  },
  server: {
    // `npm run dev`: the API on the same origin via the dev server's proxy (make demo on :6000).
    proxy: Object.fromEntries(
      ["/predict", "/predictions", "/health", "/objects", "/openapi.json"].map((path) => [
        path,
        { target: process.env.D3_API ?? "http://127.0.0.1:6000", changeOrigin: false },
      ]),
    ),
  },
  test: {
    environment: "jsdom",
    setupFiles: ["./src/test/setup.ts"],
    include: ["src/**/*.test.{ts,tsx}"],
    css: false,
  },
});
