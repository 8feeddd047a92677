// Drives Debian's Chromium (headless) through the service's /docs page: every operation of the
// served document must be rendered, and "Try it out" must work against the same origin.
// Usage: node docs-page.mjs SERVICE_URL SCREENSHOT_PATH   (prints one JSON line of findings)
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const requests = [];
try {
  const page = await browser.newPage();
  page.on("request", (request) => requests.push(request.url()));
  await page.goto(`${url}/docs`);
  await page.waitForSelector(".opblock", { timeout: 20000 });
  const rendered = await page.$$eval(".opblock", (blocks) => blocks.map((block) => block.id));

  // Try it out on GET /healthz and GET /api/users/{username}, from the page itself.
  const tried = {};
  for (const [operation, fill] of [["probes-healthz", null], ["profiles-getUser", "nobody"]]) {
    const block = page.locator(`#operations-${operation}`);
    await block.locator(".opblock-summary").click();
    await block.locator("button.try-out__btn").click();
    if (fill) await block.locator("input[placeholder='username']").fill(fill);
    await block.locator("button.execute").click();
    const status = block.locator(".live-responses-table tbody .response-col_status").first();
    await status.waitFor({ timeout: 20000 });
    tried[operation] = (await status.innerText()).trim();
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  const elsewhere = requests.filter((address) => !address.startsWith(url));
  console.log(JSON.stringify({ rendered, tried, elsewhere }));
} finally {
  await browser.close();
}
