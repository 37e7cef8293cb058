// Headless Chromium for the browser tests of the web client, driven by playwright-core (installed
// with the Node tests' packages in test/node; `npx playwright install` cannot download browsers
// here, so the Debian `chromium` package is used, found at BGT_CHROMIUM or /usr/bin/chromium).
//
// Every browser gets a fresh profile in a temporary directory (removed by close()) and the flags
// that make Chromium quiet and deterministic in a container. Each page records its console errors
// and uncaught exceptions, so a test can assert that a page produced none.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const nodeTests = path.resolve(here, '..', '..', 'node');
const require = createRequire(path.join(nodeTests, 'package.json'));

/** playwright-core, resolved from test/node/node_modules. */
export async function playwright() {
    return require('playwright-core');
}

export function chromiumPath() {
    for (const p of [process.env.BGT_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser']) {
        if (p && fs.existsSync(p)) return p;
    }
    return null;
}

/** Why the browser tests cannot run here, or false. */
export function browserSkipReason() {
    if (!chromiumPath()) return 'chromium is not installed (scripts/deps.sh installs the Debian package)';
    try {
        require.resolve('playwright-core');
    } catch {
        return 'playwright-core is not installed (npm ci in test/node; scripts/deps.sh does it)';
    }
    return false;
}

export const chromiumArgs = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
];

/**
 * A browser context on a fresh profile: { context, newPage(), close() }. Pages made by newPage()
 * carry `errors` (console errors and page errors, as strings).
 */
export async function launch({ locale = 'en-US', ignoreHTTPSErrors = false, viewport = { width: 1280, height: 800 } } = {}) {
    const { chromium } = await playwright();
    const dir = fs.mkdtempSync(path.join(process.env.TMPDIR || os.tmpdir(), 'bgb.'));
    const context = await chromium.launchPersistentContext(dir, {
        executablePath: chromiumPath(),
        headless: true,
        args: chromiumArgs,
        locale,
        viewport,
        ignoreHTTPSErrors,
    });
    return {
        context,
        async newPage() {
            const page = await context.newPage();
            page.errors = [];
            page.on('console', (msg) => {
                if (msg.type() === 'error') page.errors.push(`console: ${msg.text()} (${msg.location()?.url ?? ''})`);
            });
            page.on('pageerror', (err) => page.errors.push(`page error: ${err.message}`));
            return page;
        },
        async close() {
            await context.close().catch(() => {});
            fs.rmSync(dir, { recursive: true, force: true });
        },
    };
}
