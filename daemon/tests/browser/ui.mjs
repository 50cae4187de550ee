// The web UI in a real headless Chromium (playwright-core, Debian's chromium): each
// page loads against a daemon with real runs, a run is triggered from the UI (the
// token asked for in a prompt), seen to complete, its log opened, and the DAG has one
// node per step. Screenshots go to $SCREENSHOTS.
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const url = process.env.URL, token = process.env.TOKEN, shots = process.env.SCREENSHOTS;
const fail = (msg) => { console.error("ui: FAIL: " + msg); process.exit(1); };
const browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "millrace-ui-")), {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = browser.pages()[0] || await browser.newPage();
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
page.on("dialog", (d) => d.accept(token));
page.on("request", (r) => { if (!r.url().startsWith(url) && !r.url().startsWith("data:")) errors.push("external request: " + r.url()); });
const shot = (name) => page.screenshot({ path: join(shots, name + ".png"), fullPage: true });

// Pipelines list.
const t0 = Date.now();
await page.goto(url + "/");
await page.waitForSelector("#pipelines tr[data-pipeline='ui-chain']");
const firstLoad = Date.now() - t0; // navigation to the rendered pipelines table
const nav = await page.evaluate(() => JSON.stringify(performance.getEntriesByType("navigation")[0]?.toJSON?.() ?? {}));
const domLoaded = Math.round(JSON.parse(nav).domContentLoadedEventEnd || 0);
await shot("1-pipelines");
// Pipeline view: the DAG has one node per step.
await page.click("a[href='#/p/ui-chain']");
await page.waitForSelector("#dag .node");
const nodes = await page.$$eval("#dag .node", (n) => n.map((x) => x.dataset.step));
const steps = await (await fetch(url + "/api/v1/pipelines/ui-chain")).json();
if (nodes.length !== steps.steps.length) fail(`DAG has ${nodes.length} nodes for ${steps.steps.length} steps`);
if ((await page.$$("#dag .edge")).length < 2) fail("DAG edges missing");
// The metric the runs report, across runs.
await page.waitForSelector("#metric-chart circle");
await shot("2-pipeline");
// Trigger from the UI: the token prompt is answered, the run page follows it to the end.
await page.click("button[data-trigger='ui-chain']");
await page.waitForFunction(() => location.hash.startsWith("#/r/"));
const runId = await page.evaluate(() => location.hash.slice(4));
await page.waitForSelector("h2 [data-status='succeeded']", { timeout: 60000 });
const stepRows = await page.$$eval("#steps tr[data-step]", (r) => r.length);
if (stepRows !== steps.steps.length) fail(`run view lists ${stepRows} steps`);
// The container step names its image and digest.
const placement = await page.textContent("tr[data-step='render'] .placement");
if (!/millrace-busybox:1 [0-9a-f]{12}/.test(placement)) fail("container placement: " + JSON.stringify(placement));
// The params in a step's key: the one it uses.
const used = await page.textContent("tr[data-step='nap'] .params");
if (used !== "params secs = 1") fail("nap params: " + JSON.stringify(used));
if (await page.$("tr[data-step='copy'] .params")) fail("copy shows params it does not use");
await shot("3-run");
// Its log.
await page.click("button[data-log='nap']");
await page.waitForSelector("#log[data-done='1']", { timeout: 30000 });
const log = await page.textContent("#log");
if (!log.includes("slept")) fail("log: " + JSON.stringify(log));
await shot("4-log");
// Runs and modules pages.
await page.click("#nav-runs");
await page.waitForSelector(`#runs tr[data-run='${runId}']`);
await shot("5-runs");
await page.click("#nav-modules");
await page.waitForSelector("#modules");
await shot("6-modules");
if (errors.length) fail(errors.join("\n"));
await browser.close();
console.log(`ui: OK (run ${runId} triggered from the UI; ${nodes.length} DAG nodes; first page load ${firstLoad} ms to the rendered table, DOMContentLoaded at ${domLoaded} ms; screenshots in ${shots})`);
