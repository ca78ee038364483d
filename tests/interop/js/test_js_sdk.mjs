// Interop test: matrix-js-sdk (the SDK behind Element Web) against a real Switchboard binary.
//
// Starts the server on a free loopback port in a temporary directory (the same homeserver.yaml
// keys as tests/interop/conftest.py), registers two users over plain HTTP, then drives both with
// matrix-js-sdk: password login, startClient() until the sync state is PREPARED, one creates a
// public room, the other joins, and each must see the other's message arrive through
// `Room.timeline`.
//
// Then it makes a few dozen more of the calls a client such as Element makes (profile, presence,
// typing, receipts, tags, aliases, the room directory, media, ...), each a check that says what it
// proves and fails the run when it fails. Only the endpoints the README's feature table lists as
// missing (README_MISSING, which quotes that table) may answer 404 M_UNRECOGNIZED without failing
// it: they are reported as not implemented. At the end every error response the server sent (from
// its own request log, with the errcode the SDK saw) must be one of those, or a refusal a check
// requires (EXPECTED_REFUSALS); anything else fails the run, as does a promise rejection nobody
// handled. The SDK's own warnings are listed, not failed on: they are about the SDK.
//
// Environment:
//   SWITCHBOARD_BIN        server binary (default: target/debug/switchboard in the repo root;
//                          a relative path is taken from the current directory)
//   RUST_LOG               passed to the server (default: info,tower_http=debug; the error report
//                          needs tower_http at debug, which logs one line per request and status)
//   SWITCHBOARD_KEEP_DATA  set to 1 to keep the temporary directory after a passing run
//   SWITCHBOARD_TEST_DATABASE  `postgres`: the server runs on a fresh PostgreSQL database, dropped
//                          at the end (default: SQLite in the temporary directory)
//   SWITCHBOARD_TEST_POSTGRES  the maintenance connection that creates and drops it
//                          (default: postgresql://postgres@127.0.0.1:5432/postgres)
//   SWITCHBOARD_JS_TRACE   set to 1 to write every SDK request and response, bodies included, to
//                          sdk-trace.jsonl in the temporary directory (kept then)
//
// Exits 0 when every step and check passed, 1 otherwise, after listing the failed ones; the last
// line reads "interop: N passed, N failed, N not implemented (listed as missing in README)".

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { accessSync, constants as fsConstants, createWriteStream } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { isDeepStrictEqual } from "node:util";
import { fileURLToPath } from "node:url";
import pg from "pg";

// First: quiets the SDK's logger before the SDK's own modules bind to its methods.
import { safeJson, sdkWarnings } from "./sdk_logger.mjs";
import {
    ClientEvent,
    Direction,
    EventTimelineSet,
    EventType,
    Method,
    MsgType,
    Preset,
    RoomEvent,
    RoomMemberEvent,
    SyncState,
    createClient,
} from "matrix-js-sdk";

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const SERVER_NAME = "localhost";
const PASSWORD = "correct horse battery staple";

const READY_TIMEOUT_MS = 30_000; // for the server to answer /versions
const STOP_TIMEOUT_MS = 10_000; // for the server to exit after SIGTERM
const PREPARED_TIMEOUT_MS = 30_000; // for startClient() to reach PREPARED
const DELIVERY_TIMEOUT_MS = 5_000; // for a message to reach the other user's timeline
const LOG_TAIL_LINES = 60;
// The config's max_upload_size, in Synapse's format, and what /media/config must then announce.
const MAX_UPLOAD_SIZE = "7M";
const MAX_UPLOAD_SIZE_BYTES = 7 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Steps and assertions

const noop = () => {};

class CheckFailed extends Error {}

function assert(condition, message) {
    if (!condition) throw new CheckFailed(message);
}

function assertEqual(actual, expected, what) {
    assert(
        actual === expected,
        `${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`,
    );
}

function assertDeepEqual(actual, expected, what) {
    assert(
        isDeepStrictEqual(actual, expected),
        `${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`,
    );
}

const results = []; // {name, ok, ms, error}: every step and check; one failure fails the run
const runStart = performance.now();

function record(name, start, error = null) {
    const ms = Math.round(performance.now() - start);
    results.push({ name, ok: !error, ms, error });
    if (!error) {
        console.log(`ok   ${name} (${ms} ms)`);
    } else {
        console.log(`FAIL ${name} (${ms} ms)`);
        console.log(indent(describeError(error)));
    }
}

/** A step of the core flow: later steps need it, so a failure is recorded and ends the flow. */
async function step(name, fn) {
    const start = performance.now();
    try {
        const value = await fn();
        record(name, start);
        return value;
    } catch (error) {
        record(name, start, error);
        throw error;
    }
}

const CHECK_TIMEOUT_MS = 10_000; // more than DELIVERY_TIMEOUT_MS, so a wait inside says what it missed
// The key backup check waits out the SDK's random pause (up to 10 s) before it uploads room keys,
// on top of two logins and a room: it gets its own bound, above the upload wait inside it.
const BACKUP_UPLOAD_WAIT_MS = 30_000;
const BACKUP_CHECK_TIMEOUT_MS = 60_000;

/** One check of an endpoint the README lists as done: a failure (or no answer within
 * `timeoutMs`) is recorded and fails the run, and the next check runs all the same. */
async function check(name, fn, timeoutMs = CHECK_TIMEOUT_MS) {
    const start = performance.now();
    try {
        await withTimeout(name, fn, timeoutMs);
        record(name, start);
    } catch (error) {
        record(name, start, error);
    }
}

/** Runs `fn`, rejecting if it takes longer than `ms`. */
function withTimeout(name, fn, ms = CHECK_TIMEOUT_MS) {
    return waitFor(name, ms, (ok, fail) => {
        Promise.resolve().then(fn).then(ok, fail);
    });
}

function describeError(error) {
    if (error instanceof CheckFailed) return error.message;
    // MatrixError carries the HTTP status and the response body.
    if (error && error.httpStatus !== undefined) {
        const body = error.data ? JSON.stringify(error.data) : "";
        return `${error.name}: HTTP ${error.httpStatus} ${error.url ?? ""}\n${body}\n${error.stack ?? ""}`;
    }
    return error?.stack ?? String(error);
}

function indent(text) {
    return String(text)
        .split("\n")
        .map((line) => `     ${line}`)
        .join("\n");
}

/** Resolves with what `subscribe(resolve)` delivers, or rejects after `ms` with `what`. */
function waitFor(what, ms, subscribe) {
    let cleanup = noop;
    const promise = new Promise((resolvePromise, reject) => {
        const timer = setTimeout(
            () => reject(new CheckFailed(`timed out after ${ms} ms waiting for ${what}`)),
            ms,
        );
        const unsubscribe = subscribe(resolvePromise, reject) ?? noop;
        cleanup = () => {
            clearTimeout(timer);
            unsubscribe();
        };
    });
    return promise.finally(() => cleanup());
}

// ---------------------------------------------------------------------------------------------
// The homeserver

function serverBinary() {
    const configured = process.env.SWITCHBOARD_BIN;
    return configured ? resolve(configured) : join(REPO_ROOT, "target/debug/switchboard");
}

function freePort() {
    return new Promise((resolvePort, reject) => {
        const server = createServer();
        server.unref();
        server.on("error", reject);
        server.listen(0, "127.0.0.1", () => {
            const { port } = server.address();
            server.close(() => resolvePort(port));
        });
    });
}

const yamlStr = (value) => JSON.stringify(String(value)); // a JSON string is a valid YAML scalar

const POSTGRES_SELECTED = process.env.SWITCHBOARD_TEST_DATABASE === "postgres";
const POSTGRES_ADMIN_URL =
    process.env.SWITCHBOARD_TEST_POSTGRES || "postgresql://postgres@127.0.0.1:5432/postgres";

/** A fresh, empty PostgreSQL database for the server, made as the Rust tests and conftest.py make
 * theirs (crates/switchboard-store/src/testing.rs); `drop()` removes it. */
class PostgresDatabase {
    static #count = 0;

    constructor(name, { host, port, user }) {
        Object.assign(this, { name, host, port, user });
    }

    static async create() {
        const nanos = process.hrtime.bigint() % 1_000_000_000n;
        const name = `sbtest_${process.pid}_${PostgresDatabase.#count++}_${nanos}`;
        const admin = await PostgresDatabase.#admin(
            `CREATE DATABASE ${name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'`,
        );
        return new PostgresDatabase(name, admin);
    }

    /** Runs one statement on the maintenance database (no transaction: CREATE/DROP DATABASE). */
    static async #admin(statement) {
        const admin = new pg.Client({ connectionString: POSTGRES_ADMIN_URL });
        await admin.connect();
        try {
            await admin.query(statement);
        } finally {
            await admin.end();
        }
        return admin;
    }

    /** The `database:` block of a homeserver.yaml for this database. */
    configBlock() {
        return (
            `database: {name: psycopg2, args: {user: ${yamlStr(this.user)}, dbname: ${this.name}, ` +
            `host: ${yamlStr(this.host)}, port: ${this.port}, cp_min: 1, cp_max: 10}}`
        );
    }

    async drop() {
        await PostgresDatabase.#admin(`DROP DATABASE IF EXISTS ${this.name} WITH (FORCE)`);
    }
}

/** Writes a Synapse-style homeserver.yaml (and a signing key); the keys of conftest.py. On
 * `database` (a PostgresDatabase) if given, else on SQLite in dataDir. */
async function writeConfig(dataDir, port, database = null) {
    const signingKey = join(dataDir, "signing.key");
    const seed = randomBytes(32).toString("base64").replace(/=+$/, "");
    await writeFile(signingKey, `ed25519 a_test ${seed}\n`);
    const databaseBlock = database
        ? database.configBlock()
        : `database: {name: sqlite3, args: {database: ${yamlStr(join(dataDir, "homeserver.db"))}}}`;
    const config = join(dataDir, "homeserver.yaml");
    await writeFile(
        config,
        `server_name: ${SERVER_NAME}
listeners:
  - port: ${port}
    bind_addresses: ['127.0.0.1']
    type: http
    resources: [{names: [client]}]
${databaseBlock}
media_store_path: ${yamlStr(join(dataDir, "media"))}
signing_key_path: ${yamlStr(signingKey)}
max_upload_size: ${MAX_UPLOAD_SIZE}
enable_registration: true
enable_registration_without_verification: true
registration_shared_secret: "${randomBytes(16).toString("hex")}"
app_service_config_files: []
rc_message: {per_second: 1000, burst_count: 1000}
rc_registration: {per_second: 1000, burst_count: 1000}
rc_login:
  address: {per_second: 1000, burst_count: 1000}
  account: {per_second: 1000, burst_count: 1000}
  failed_attempts: {per_second: 1000, burst_count: 1000}
rc_joins: {local: {per_second: 1000, burst_count: 1000}}
rc_invites:
  per_room: {per_second: 1000, burst_count: 1000}
  per_user: {per_second: 1000, burst_count: 1000}
  per_issuer: {per_second: 1000, burst_count: 1000}
`,
    );
    return config;
}

class Homeserver {
    constructor(binary, dataDir, port) {
        this.binary = binary;
        this.dataDir = dataDir;
        this.port = port;
        this.url = `http://127.0.0.1:${port}`;
        this.logPath = join(dataDir, "server.log");
        this.proc = null;
        this.exited = null; // resolves with {code, signal} when the process ends
        // With SWITCHBOARD_TEST_DATABASE=postgres: its PostgreSQL database, made at the first
        // start, kept across restarts; main() drops it.
        this.database = null;
    }

    async start() {
        if (POSTGRES_SELECTED) this.database ??= await PostgresDatabase.create();
        const config = await writeConfig(this.dataDir, this.port, this.database);
        const log = createWriteStream(this.logPath, { flags: "a" });
        await new Promise((ok) => log.write(`===== starting ${this.binary} =====\n`, ok));
        const env = {
            ...process.env,
            RUST_LOG: process.env.RUST_LOG || "info,tower_http=debug",
            NO_COLOR: "1",
        };
        this.proc = spawn(this.binary, ["--config", config], {
            cwd: this.dataDir,
            env,
            stdio: ["ignore", "pipe", "pipe"],
        });
        this.proc.stdout.pipe(log, { end: false });
        this.proc.stderr.pipe(log, { end: false });
        this.exited = new Promise((done) => {
            this.proc.on("error", (error) => done({ code: null, signal: null, error }));
            this.proc.on("exit", (code, signal) => done({ code, signal }));
        });
        this.exited.then(() => setTimeout(() => log.end(), 100));
        await this.waitReady();
    }

    async waitReady() {
        const versions = `${this.url}/_matrix/client/versions`;
        const deadline = Date.now() + READY_TIMEOUT_MS;
        let lastError = "no attempt";
        let exit = null;
        this.exited.then((status) => (exit = status));
        while (Date.now() < deadline) {
            if (exit) {
                throw new CheckFailed(
                    `server exited during startup (code ${exit.code}, signal ${exit.signal}` +
                        `${exit.error ? `, ${exit.error.message}` : ""})\n${await this.logTail()}`,
                );
            }
            try {
                const res = await fetch(versions, { signal: AbortSignal.timeout(2000) });
                const body = await res.json();
                if (Array.isArray(body.versions)) return body;
                lastError = `unexpected /versions body: ${JSON.stringify(body)}`;
            } catch (error) {
                lastError = String(error?.cause ?? error);
            }
            await new Promise((ok) => setTimeout(ok, 100));
        }
        throw new CheckFailed(
            `server not ready after ${READY_TIMEOUT_MS} ms (GET ${versions}: ${lastError})\n` +
                (await this.logTail()),
        );
    }

    get running() {
        const proc = this.proc;
        return Boolean(proc && proc.exitCode === null && proc.signalCode === null);
    }

    /** SIGTERM and wait; SIGKILL and throw if it does not exit in time. */
    async stop() {
        const proc = this.proc;
        this.proc = null;
        if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
        proc.kill("SIGTERM");
        const timedOut = Symbol("timeout");
        let timer;
        const outcome = await Promise.race([
            this.exited,
            new Promise((ok) => (timer = setTimeout(() => ok(timedOut), STOP_TIMEOUT_MS))),
        ]);
        clearTimeout(timer);
        if (outcome === timedOut) {
            proc.kill("SIGKILL");
            await this.exited;
            throw new CheckFailed(`server did not exit within ${STOP_TIMEOUT_MS} ms of SIGTERM`);
        }
    }

    async logText() {
        try {
            return await readFile(this.logPath, "utf8");
        } catch {
            return "";
        }
    }

    async logTail(lines = LOG_TAIL_LINES) {
        const text = await this.logText();
        if (!text) return "(no server log)";
        const tail = text.trimEnd().split("\n").slice(-lines).join("\n");
        return `--- last ${lines} lines of ${this.logPath} ---\n${tail}`;
    }
}

/** Registers `localpart` over plain HTTP (UIA with m.login.dummy); returns the response body. */
async function registerUser(hsUrl, localpart) {
    const url = `${hsUrl}/_matrix/client/v3/register`;
    const request = {
        username: localpart,
        password: PASSWORD,
        auth: { type: "m.login.dummy" },
        inhibit_login: true,
    };
    const res = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
    });
    const text = await res.text();
    assert(
        res.status === 200,
        `POST ${url} ${JSON.stringify(request)}\n-> HTTP ${res.status} ${text}`,
    );
    const body = JSON.parse(text);
    assertEqual(body.user_id, `@${localpart}:${SERVER_NAME}`, "register user_id");
    return body;
}

// ---------------------------------------------------------------------------------------------
// What the SDK asked for: every request through fetchFn, so errors can be listed with errcodes.

const sdkRequests = []; // {who, phase, method, path, status, errcode, error}
let stopping = false;
const stoppedClients = new Set(); // clients a check stopped early: their aborted /sync is theirs
let phase = "core flow"; // "further calls" once the core flow has passed
const TRACING = process.env.SWITCHBOARD_JS_TRACE === "1";
let traceStream = null; // opened in main() when TRACING

function trace(record) {
    traceStream?.write(`${safeJson({ t: new Date().toISOString(), ...record })}\n`);
}

function recordingFetch(who) {
    return async (input, init = {}) => {
        const url = new URL(typeof input === "string" || input instanceof URL ? input : input.url);
        const method = (init.method ?? input?.method ?? "GET").toUpperCase();
        const entry = { who, phase, method, path: url.pathname };
        sdkRequests.push(entry);
        let res;
        try {
            res = await fetch(input, init);
        } catch (error) {
            // The long-poll /sync is aborted when the client stops: that is ours, not the server's.
            entry.status =
                (stopping || stoppedClients.has(who)) && error?.name === "AbortError" ? "aborted" : "network error";
            entry.error = String(error?.cause ?? error);
            throw error;
        }
        entry.status = res.status;
        if (traceStream) {
            const requestBody = typeof init.body === "string" ? init.body : undefined;
            res.clone()
                .text()
                .then((text) => trace({ who, method, url: url.href, requestBody, status: res.status, body: text }))
                .catch(noop);
        }
        if (!res.ok) {
            try {
                const body = await res.clone().json();
                entry.errcode = body?.errcode;
                entry.error = body?.error;
            } catch {
                entry.errcode = "(no JSON body)";
            }
        }
        return res;
    };
}

// ---------------------------------------------------------------------------------------------
// Matrix clients

const clients = [];
let liveServer = null; // killed on exit, whatever happens

function newClient(hsUrl, who, credentials = {}) {
    const client = createClient({
        baseUrl: hsUrl,
        fetchFn: recordingFetch(who),
        timelineSupport: true,
        ...credentials,
    });
    clients.push(client);
    return client;
}

/** Resolves once the client's sync state is PREPARED; rejects on ERROR or after the timeout. */
function waitPrepared(client, who) {
    return waitFor(`${who}'s sync state PREPARED`, PREPARED_TIMEOUT_MS, (ok, fail) => {
        const onSync = (state, prevState, data) => {
            if (state === SyncState.Prepared) ok();
            else if (state === SyncState.Error) {
                fail(
                    new CheckFailed(
                        `${who}'s sync went ${prevState} -> ERROR: ${describeError(data?.error)}`,
                    ),
                );
            }
        };
        client.on(ClientEvent.Sync, onSync);
        return () => client.off(ClientEvent.Sync, onSync);
    });
}

/** Resolves with the first m.room.message in `roomId` from `sender` with `body` in the live timeline. */
function waitForMessage(client, who, roomId, sender, body) {
    return waitFor(
        `${who} to receive ${JSON.stringify(body)} from ${sender} via Room.timeline`,
        DELIVERY_TIMEOUT_MS,
        (ok) => {
            const onTimeline = (event, room, toStartOfTimeline) => {
                if (toStartOfTimeline || room?.roomId !== roomId) return;
                if (event.getType() !== EventType.RoomMessage) return;
                if (event.getSender() !== sender) return;
                if (event.getContent()?.body !== body) return;
                ok(event);
            };
            client.on(RoomEvent.Timeline, onTimeline);
            return () => client.off(RoomEvent.Timeline, onTimeline);
        },
    );
}

/** Resolves once `client` sees `userId` joined to `roomId` (room state from /sync). */
function waitForJoined(client, who, roomId, userId) {
    const joined = () => client.getRoom(roomId)?.getMember(userId)?.membership === "join";
    return waitFor(`${who} to see ${userId} joined to ${roomId}`, DELIVERY_TIMEOUT_MS, (ok) => {
        if (joined()) {
            ok();
            return noop;
        }
        // A brand-new room is stored (and ClientEvent.Room emitted) only after its state and
        // timeline events have been emitted, so re-check on that too.
        const recheck = () => joined() && ok();
        const events = [ClientEvent.Room, RoomMemberEvent.Membership, RoomEvent.Timeline];
        for (const name of events) client.on(name, recheck);
        return () => {
            for (const name of events) client.off(name, recheck);
        };
    });
}

// ---------------------------------------------------------------------------------------------
// The server's view: every request it logged with a 4xx/5xx status.

const REQUEST_LINE =
    /request\{method=(\S+) uri=(\S+) version=[^}]*\}: tower_http::trace::on_response: finished processing request .*status=(\d+)/;

/** A path with its IDs and transaction IDs replaced by placeholders, for grouping. */
function normalizePath(rawPath) {
    const path = rawPath.split("?")[0];
    const segments = path.split("/").map((segment) => {
        let decoded;
        try {
            decoded = decodeURIComponent(segment);
        } catch {
            decoded = segment;
        }
        if (/^![^:]+:/.test(decoded)) return "{roomId}";
        if (/^@[^:]+:/.test(decoded)) return "{userId}";
        if (/^#[^:]+:/.test(decoded)) return "{roomAlias}";
        if (/^\$/.test(decoded)) return "{eventId}";
        return segment;
    });
    // Transaction IDs and filter IDs are opaque.
    for (let i = 0; i < segments.length; i++) {
        const before = segments[i - 1];
        const before2 = segments[i - 2];
        if (before2 === "send" || before2 === "sendToDevice") segments[i] = "{txnId}";
        if (before === "filter" && segments[i - 2] === "{userId}") segments[i] = "{filterId}";
    }
    return segments.join("/");
}

/** Every error the server answered with, grouped by method, path and status: from its request log,
 * with the errcodes the SDK saw, and from the SDK's own record (so nothing is lost when the log
 * has no request lines). Each group gets `explained`: why it is no failure, or null. */
function errorReport(logText) {
    const groups = new Map(); // "METHOD path status" -> {method, path, status, count, errcodes, phases}
    const group = (method, path, status) => {
        const key = `${method} ${path} ${status}`;
        if (!groups.has(key)) {
            groups.set(key, { method, path, status, count: 0, errcodes: new Set(), phases: new Set() });
        }
        return groups.get(key);
    };
    let seen = 0;
    for (const line of logText.split("\n")) {
        const match = REQUEST_LINE.exec(line);
        if (!match) continue;
        seen++;
        const [, method, uri, statusText] = match;
        const status = Number(statusText);
        if (status >= 400) group(method, normalizePath(uri), status).count++;
    }
    for (const request of sdkRequests) {
        if (typeof request.status !== "number" || request.status < 400) continue;
        const g = group(request.method, normalizePath(request.path), request.status);
        if (seen === 0) g.count++;
        if (request.errcode) g.errcodes.add(request.errcode);
        g.phases.add(request.phase);
    }
    for (const g of groups.values()) g.explained = explainError(g);
    const networkErrors = sdkRequests.filter((r) => r.status === "network error");
    return { seen, groups: [...groups.values()], networkErrors };
}

/** Why an error group is no failure: the spec's ordinary answer to what a check does
 * (EXPECTED_ANSWERS), or an endpoint the README lists as missing or a refusal a check requires,
 * both only as 404 M_UNRECOGNIZED. null for anything else. */
function explainError(g) {
    const answer = EXPECTED_ANSWERS.find(
        ({ path, status, errcode }) => path.test(g.path) && g.status === status && [...g.errcodes].every((e) => e === errcode),
    );
    if (answer) return `expected: ${answer.why}`;
    const unrecognized =
        g.status === 404 && [...g.errcodes].every((errcode) => errcode === "M_UNRECOGNIZED");
    if (!unrecognized) return null;
    const missing = Object.values(README_MISSING).find(({ path }) => path.test(g.path));
    if (missing) return `not implemented (listed as missing in README: "${missing.feature}")`;
    const refusal = EXPECTED_REFUSALS.find(({ path }) => path.test(g.path));
    if (refusal) return `expected: ${refusal.why}`;
    return null;
}

// ---------------------------------------------------------------------------------------------
// The test

async function main() {
    const binary = serverBinary();
    try {
        accessSync(binary, fsConstants.X_OK);
    } catch {
        throw new CheckFailed(
            `switchboard binary not found at ${binary} (build it, or set SWITCHBOARD_BIN)`,
        );
    }
    const dataDir = await mkdtemp(join(tmpdir(), "switchboard-js-sdk-"));
    const server = new Homeserver(binary, dataDir, await freePort());
    liveServer = server;
    console.log(`matrix-js-sdk interop: server ${binary}, data ${dataDir}`);
    if (TRACING) traceStream = createWriteStream(join(dataDir, "sdk-trace.jsonl"));

    let flowError = null;
    let started = false;
    try {
        await step("server answers /_matrix/client/versions", () => server.start());
        started = true;
        await runFlow(server.url);
    } catch (error) {
        flowError = error;
    } finally {
        stopping = true;
        for (const client of clients) {
            try {
                client.stopClient();
            } catch (error) {
                record("stopClient() stops a client", performance.now(), error);
            }
        }
        if (server.running) {
            try {
                await step("server exits on SIGTERM", () => server.stop());
            } catch (error) {
                flowError ??= error;
            }
        } else if (started) {
            const exit = await server.exited;
            record(
                "server is still running after the checks",
                performance.now(),
                new CheckFailed(`the server exited by itself (code ${exit.code}, signal ${exit.signal})`),
            );
        }
        try {
            await server.database?.drop();
        } catch (error) {
            flowError ??= error;
        }
    }

    const unexplained = printErrorReport(errorReport(await server.logText()));
    record(
        "every error the server answered with is an endpoint the README lists as missing, or a refusal a check expects",
        performance.now(),
        unexplained.length
            ? new CheckFailed(`unexplained error responses:\n${unexplained.join("\n")}`)
            : null,
    );

    const failed = results.some((r) => !r.ok);
    if (failed || flowError) {
        console.log(`\n${await server.logTail()}`);
        console.log(`data directory kept: ${dataDir}`);
    } else if (process.env.SWITCHBOARD_KEEP_DATA === "1" || TRACING) {
        console.log(`data directory kept: ${dataDir}`);
    } else {
        await rm(dataDir, { recursive: true, force: true });
    }
    return !failed && !flowError;
}

async function runFlow(hsUrl) {
    const suffix = randomBytes(3).toString("hex");
    const alice = { localpart: `alice_${suffix}`, name: "alice" };
    const bob = { localpart: `bob_${suffix}`, name: "bob" };
    for (const user of [alice, bob]) user.userId = `@${user.localpart}:${SERVER_NAME}`;

    await step("register alice and bob (HTTP, m.login.dummy)", async () => {
        await registerUser(hsUrl, alice.localpart);
        await registerUser(hsUrl, bob.localpart);
    });

    // Password login with both shapes the SDK offers: loginWithPassword() sends the legacy
    // `user` field, login("m.login.password") here sends an m.id.user identifier. As the SDK
    // recommends, the logged-in session then gets a fresh client built from the credentials.
    await step("alice logs in with loginWithPassword()", async () => {
        const response = await newClient(hsUrl, "alice-login").loginWithPassword(
            alice.userId,
            PASSWORD,
        );
        assertEqual(response.user_id, alice.userId, "alice's login user_id");
        assert(response.access_token, "alice's login returned no access_token");
        assert(response.device_id, "alice's login returned no device_id");
        alice.credentials = response;
    });
    await step('bob logs in with login("m.login.password")', async () => {
        const response = await newClient(hsUrl, "bob-login").login("m.login.password", {
            identifier: { type: "m.id.user", user: bob.localpart },
            password: PASSWORD,
            initial_device_display_name: "matrix-js-sdk interop",
        });
        assertEqual(response.user_id, bob.userId, "bob's login user_id");
        assert(response.access_token, "bob's login returned no access_token");
        assert(response.device_id, "bob's login returned no device_id");
        bob.credentials = response;
    });

    for (const user of [alice, bob]) {
        user.client = newClient(hsUrl, user.name, {
            accessToken: user.credentials.access_token,
            userId: user.credentials.user_id,
            deviceId: user.credentials.device_id,
        });
    }

    await step("whoami agrees with the login responses", async () => {
        for (const user of [alice, bob]) {
            const whoami = await user.client.whoami();
            assertEqual(whoami.user_id, user.userId, `${user.name}'s whoami user_id`);
            assertEqual(whoami.device_id, user.credentials.device_id, `${user.name}'s whoami device_id`);
        }
    });

    await step("startClient() reaches sync state PREPARED for both", async () => {
        const prepared = [alice, bob].map((user) => waitPrepared(user.client, user.name));
        for (const user of [alice, bob]) await user.client.startClient({ initialSyncLimit: 10 });
        await Promise.all(prepared);
    });

    const roomId = await step("alice creates a public room", async () => {
        const response = await alice.client.createRoom({
            preset: Preset.PublicChat,
            name: "js-sdk interop",
            topic: "matrix-js-sdk meets Switchboard",
        });
        assert(
            typeof response.room_id === "string" && response.room_id.startsWith("!"),
            `createRoom returned ${JSON.stringify(response)}`,
        );
        await waitForJoined(alice.client, "alice", response.room_id, alice.userId);
        return response.room_id;
    });

    await step("bob joins the room", async () => {
        const room = await bob.client.joinRoom(roomId);
        assertEqual(room.roomId, roomId, "joinRoom's room");
        await waitForJoined(bob.client, "bob", roomId, bob.userId);
        await waitForJoined(alice.client, "alice", roomId, bob.userId);
        const name = bob.client.getRoom(roomId)?.name;
        assertEqual(name, "js-sdk interop", "room name bob sees");
    });

    const aliceMessage = await step("bob receives alice's sendTextMessage() via Room.timeline", async () => {
        const body = `hello bob, from alice (${suffix})`;
        const received = waitForMessage(bob.client, "bob", roomId, alice.userId, body);
        const sent = await alice.client.sendTextMessage(roomId, body);
        assert(sent?.event_id?.startsWith("$"), `sendTextMessage returned ${JSON.stringify(sent)}`);
        const event = await received;
        assertEqual(event.getId(), sent.event_id, "event ID bob received");
        assertEqual(event.getContent().msgtype, MsgType.Text, "msgtype bob received");
        return event;
    });

    await step("alice receives bob's sendMessage() via Room.timeline", async () => {
        const body = `hello alice, from bob (${suffix})`;
        const received = waitForMessage(alice.client, "alice", roomId, bob.userId, body);
        const sent = await bob.client.sendMessage(roomId, { msgtype: MsgType.Text, body });
        assert(sent?.event_id?.startsWith("$"), `sendMessage returned ${JSON.stringify(sent)}`);
        const event = await received;
        assertEqual(event.getId(), sent.event_id, "event ID alice received");
    });

    await furtherChecks({ alice, bob, roomId, aliceMessage, suffix });
}

// ---------------------------------------------------------------------------------------------
// More of what a client such as Element asks for, once the core flow works. Each check states what
// it proves and fails the run when it fails; the next check runs all the same, so one run lists
// every failure. Only the endpoints the README's feature table lists as missing may answer
// 404 M_UNRECOGNIZED without failing the run: they are reported as not implemented.

// The README's feature table row of what is missing, verbatim; the first check makes sure the
// README still says so, so that this allow-list cannot outlive it.
const README_MISSING_ROW =
    "| User directory search, room hierarchy, OpenID tokens, 3PIDs | missing — answer `404 M_UNRECOGNIZED` |";

// The endpoints of that row this test calls: the README's words for each, and the request paths
// (as normalizePath writes them) whose 404 M_UNRECOGNIZED that row explains.
const README_MISSING = {
    threePids: { feature: "3PIDs", path: /^\/_matrix\/client\/(v3|r0)\/account\/3pid$/ },
    hierarchy: {
        feature: "room hierarchy",
        path: /^\/_matrix\/client\/(v1|unstable\/org\.matrix\.msc2946)\/rooms\/\{roomId\}\/hierarchy$/,
    },
    userDirectory: {
        feature: "User directory search",
        path: /^\/_matrix\/client\/(v3|r0)\/user_directory\/search$/,
    },
    openId: {
        feature: "OpenID tokens",
        path: /^\/_matrix\/client\/(v3|r0)\/user\/\{userId\}\/openid\/request_token$/,
    },
};

// Endpoints the README does not mention, which the checks below require to be refused with
// 404 M_UNRECOGNIZED, the spec's answer for an endpoint a server does not have.
const EXPECTED_REFUSALS = [
    {
        path: /^\/_matrix\/client\/unstable\/org\.matrix\.msc2965\/auth_(metadata|issuer)$/,
        why: "OIDC discovery (MSC2965): the server has no OAuth 2.0 login",
    },
    {
        path: /^\/_matrix\/client\/unstable\/im\.nheko\.summary\/(summary\/\{roomId\}|rooms\/\{roomId\}\/summary)$/,
        why: "unstable MSC3266 room summary, not in the README",
    },
];

// Errors that are the spec's ordinary answer to what a check does.
const EXPECTED_ANSWERS = [
    {
        path: /^\/_matrix\/client\/v3\/room_keys\/version$/,
        status: 404,
        errcode: "M_NOT_FOUND",
        why: "no key backup yet (the SDK asks before it makes one)",
    },
];

const notImplemented = []; // {name, feature, works}: calls of endpoints the README lists as missing

function isUnrecognized(error) {
    return error?.httpStatus === 404 && error?.errcode === "M_UNRECOGNIZED";
}

/** A call of an endpoint the README lists as missing (`entry` of README_MISSING): the README's
 * 404 M_UNRECOGNIZED is reported, not failed on; working is fine too; any other error (or a
 * failed assertion on a success) fails the run. */
async function checkMissing(name, entry, fn) {
    const start = performance.now();
    const label = `${name} [listed as missing in README: "${entry.feature}"]`;
    try {
        await withTimeout(name, fn);
        notImplemented.push({ name, feature: entry.feature, works: true });
        console.log(`ok   ${label}: works, although the README lists it as missing`);
    } catch (error) {
        if (isUnrecognized(error)) {
            notImplemented.push({ name, feature: entry.feature, works: false });
            console.log(`n/i  ${label}: not implemented (404 M_UNRECOGNIZED, as the README says)`);
            return;
        }
        const message =
            error instanceof CheckFailed
                ? error.message
                : `the README says its missing endpoints answer 404 M_UNRECOGNIZED; got ${shortError(error)}`;
        record(label, start, new CheckFailed(message));
    }
}

/** Resolves if `fn` is refused with 404 M_UNRECOGNIZED; throws on success or any other error. */
async function assertUnrecognized(what, fn) {
    let value;
    try {
        value = await fn();
    } catch (error) {
        assert(isUnrecognized(error), `${what}: expected 404 M_UNRECOGNIZED, got ${shortError(error)}`);
        return;
    }
    throw new CheckFailed(`${what}: expected 404 M_UNRECOGNIZED, got a success: ${safeJson(value)}`);
}

/** Resolves once `condition()` holds, checked now and after every /sync the client processes;
 * rejects after DELIVERY_TIMEOUT_MS. Marked handled, so a failure elsewhere first is not also an
 * unhandled rejection; awaiting it still throws. */
function waitUntil(what, client, condition) {
    const promise = waitFor(what, DELIVERY_TIMEOUT_MS, (ok) => {
        const recheck = () => condition() && ok();
        client.on(ClientEvent.Sync, recheck);
        recheck();
        return () => client.off(ClientEvent.Sync, recheck);
    });
    promise.catch(noop);
    return promise;
}

/** GET on the client API with the client's token, bypassing the SDK's caches. */
function authedGet(client, path) {
    return client.http.authedRequest(Method.Get, path);
}

async function furtherChecks({ alice, bob, roomId, aliceMessage, suffix }) {
    const a = alice.client;
    const b = bob.client;
    const alias = `#js_interop_${suffix}:${SERVER_NAME}`;
    const enc = encodeURIComponent;
    phase = "further calls";

    await check("the allow-list of missing endpoints quotes the README's feature table", async () => {
        const readme = await readFile(join(REPO_ROOT, "README.md"), "utf8");
        assert(
            readme.split("\n").includes(README_MISSING_ROW),
            `README.md has no line ${README_MISSING_ROW}\n(update README_MISSING to what the README lists as missing)`,
        );
        for (const { feature } of Object.values(README_MISSING)) {
            assert(README_MISSING_ROW.includes(feature), `"${feature}" is not in the README's row`);
        }
    });

    await check("GET /login (loginFlows) offers m.login.password", async () => {
        const { flows } = await a.loginFlows();
        assert(
            flows?.some((flow) => flow.type === "m.login.password"),
            `flows: ${safeJson(flows)}`,
        );
    });

    await check("OIDC discovery (getAuthMetadata, MSC2965) is refused with 404 M_UNRECOGNIZED", () =>
        assertUnrecognized("getAuthMetadata", () => a.getAuthMetadata()),
    );

    await check("setDisplayName: bob's getProfileInfo and his /sync member list show alice's new name", async () => {
        const name = `Alice Interop ${suffix}`;
        const synced = waitUntil(
            `bob to see alice's member event with displayname ${JSON.stringify(name)}`,
            b,
            () => b.getRoom(roomId)?.getMember(alice.userId)?.rawDisplayName === name,
        );
        await a.setDisplayName(name);
        const profile = await b.getProfileInfo(alice.userId);
        assertEqual(profile?.displayname, name, "displayname in bob's getProfileInfo(alice)");
        await synced;
    });

    await check("getDevices lists each user's logged-in device, bob's with its initial_device_display_name", async () => {
        const aliceDevices = (await a.getDevices()).devices ?? [];
        assert(
            aliceDevices.some((d) => d.device_id === alice.credentials.device_id),
            `alice's device ${alice.credentials.device_id} not in ${safeJson(aliceDevices)}`,
        );
        const bobDevices = (await b.getDevices()).devices ?? [];
        const bobDevice = bobDevices.find((d) => d.device_id === bob.credentials.device_id);
        assertEqual(bobDevice?.display_name, "matrix-js-sdk interop", "bob's device display_name");
    });

    await check("setPusher adds a pusher that getPushers lists, and kind null removes it", async () => {
        const pusher = {
            pushkey: "js-sdk-pushkey",
            kind: "http",
            app_id: "org.example.jssdk",
            app_display_name: "js-sdk interop",
            device_display_name: "test device",
            lang: "en",
            // A public address: refused ranges (loopback, private) need ip_range_whitelist.
            data: { url: "https://198.51.99.1/_matrix/push/v1/notify", format: "event_id_only" },
        };
        await a.setPusher(pusher);
        const listed = (await a.getPushers()).pushers ?? [];
        const found = listed.find((p) => p.pushkey === pusher.pushkey);
        assertEqual(found?.app_id, pusher.app_id, "listed pusher app_id");
        assertEqual(found?.data?.format, "event_id_only", "listed pusher data.format");
        await a.setPusher({ ...pusher, kind: null });
        const after = (await a.getPushers()).pushers ?? [];
        assert(!after.some((p) => p.pushkey === pusher.pushkey), `pusher still listed: ${safeJson(after)}`);
    });

    await check("/notifications lists bob's message to alice as a notification (push rules on the server)", async () => {
        const response = await authedGet(a, "/notifications");
        const list = response?.notifications ?? [];
        assert(
            list.some((n) => n.room_id === roomId && n.event?.sender === bob.userId),
            `no notification of bob's messages in ${safeJson(list.slice(0, 3))}`,
        );
        const highlights = await authedGet(a, "/notifications?only=highlight");
        assert(Array.isArray(highlights?.notifications), `only=highlight: ${safeJson(highlights)}`);
    });

    await check("key backup (rust crypto): a version is made, room keys go up, a new device restores them", async () => {
        // Fresh sessions: rust crypto must be set up before a client starts.
        const session = async (who) => {
            const response = await newClient(a.baseUrl, `${who}-login`).loginWithPassword(alice.userId, PASSWORD);
            const client = newClient(a.baseUrl, who, {
                userId: response.user_id,
                accessToken: response.access_token,
                deviceId: response.device_id,
            });
            await client.initRustCrypto({ useIndexedDB: false });
            return client;
        };
        const first = await session("alice-backup-1");
        const prepared = waitPrepared(first, "alice-backup-1");
        await first.startClient({ initialSyncLimit: 5 });
        await prepared;
        const crypto = first.getCrypto();
        await crypto.resetKeyBackup();
        await crypto.checkKeyBackupAndEnable();
        const info = await authedGet(first, "/room_keys/version");
        assert(info?.version, `GET /room_keys/version after resetKeyBackup: ${safeJson(info)}`);
        assertEqual(await crypto.getActiveSessionBackupVersion(), info.version, "the SDK's active backup version");
        const { room_id: secretRoom } = await first.createRoom({
            initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
        });
        await waitUntil("the encrypted room in alice's new session", first, () => Boolean(first.getRoom(secretRoom)));
        await first.sendTextMessage(secretRoom, "kept in the backup");
        // The SDK uploads room keys after a random pause of up to 10 s (to spread the load).
        const deadline = Date.now() + BACKUP_UPLOAD_WAIT_MS;
        let version = null;
        while (Date.now() < deadline) {
            version = await authedGet(first, "/room_keys/version");
            if (version?.count >= 1) break;
            await new Promise((r) => setTimeout(r, 200));
        }
        assert(version?.count >= 1, `no room key reached the backup: ${safeJson(version)}`);
        const key = await crypto.getSessionBackupPrivateKey();
        assert(key, "no backup key cached after resetKeyBackup");
        stoppedClients.add("alice-backup-1");
        first.stopClient();

        const second = await session("alice-backup-2");
        await second.getCrypto().storeSessionBackupPrivateKey(key, info.version);
        const restored = await second.getCrypto().restoreKeyBackup();
        assert(restored?.imported >= 1, `restoreKeyBackup imported nothing: ${safeJson(restored)}`);
        stoppedClients.add("alice-backup-2");
        second.stopClient();
    }, BACKUP_CHECK_TIMEOUT_MS);

    await checkMissing("getThreePids", README_MISSING.threePids, async () => {
        const response = await a.getThreePids();
        assert(Array.isArray(response?.threepids), `getThreePids returned ${safeJson(response)}`);
    });

    await check("getJoinedRooms lists the room for alice and for bob", async () => {
        for (const [who, client] of [["alice", a], ["bob", b]]) {
            const { joined_rooms: joined } = await client.getJoinedRooms();
            assert(joined?.includes(roomId), `${who}'s joined_rooms ${safeJson(joined)} lacks ${roomId}`);
        }
    });

    await check("setAccountData: the content comes back through /sync and from GET account_data", async () => {
        const type = "org.switchboard.interop";
        const content = { suffix, nested: { list: [1, "two"] } };
        // setAccountData resolves once /sync has delivered the new value into the store.
        await a.setAccountData(type, content);
        assertDeepEqual(a.getAccountData(type)?.getContent(), content, "account data from /sync");
        const fetched = await authedGet(a, `/user/${enc(alice.userId)}/account_data/${enc(type)}`);
        assertDeepEqual(fetched, content, "GET /user/{userId}/account_data/{type}");
    });

    await check("setPresence: GET /presence shows the status, and bob's /sync delivers it", async () => {
        const statusMsg = `testing ${suffix}`;
        const synced = waitUntil(`bob to see alice online with status ${JSON.stringify(statusMsg)}`, b, () => {
            const user = b.getUser(alice.userId);
            return user?.presence === "online" && user?.presenceStatusMsg === statusMsg;
        });
        await a.setPresence({ presence: "online", status_msg: statusMsg });
        const presence = await b.getPresence(alice.userId);
        assertEqual(presence?.presence, "online", "presence in GET /presence/{alice}/status");
        assertEqual(presence?.status_msg, statusMsg, "status_msg in GET /presence/{alice}/status");
        await synced;
    });

    await check("sendTyping: alice's /sync shows bob typing, then not typing", async () => {
        const typingOf = () => a.getRoom(roomId)?.getMember(bob.userId)?.typing;
        const started = waitUntil("alice to see bob typing", a, () => typingOf() === true);
        await b.sendTyping(roomId, true, 30_000);
        await started;
        const stopped = waitUntil("alice to see bob stop typing", a, () => typingOf() === false);
        await b.sendTyping(roomId, false);
        await stopped;
    });

    let toRead = null; // a message of alice's that bob has received, for the receipt checks
    await check("alice's next message reaches bob (for the read receipt checks)", async () => {
        const body = `please read this (${suffix})`;
        const received = waitForMessage(b, "bob", roomId, alice.userId, body);
        await a.sendTextMessage(roomId, body);
        toRead = await received;
    });

    await check("sendReadReceipt: alice's /sync delivers bob's m.read receipt for her message", async () => {
        assert(toRead, "no message to read: the check before failed");
        const eventId = toRead.getId();
        const delivered = waitFor(`alice to receive bob's m.read receipt for ${eventId}`, DELIVERY_TIMEOUT_MS, (ok) => {
            const onReceipt = (event, room) => {
                if (room?.roomId === roomId && event.getContent()?.[eventId]?.["m.read"]?.[bob.userId]) ok();
            };
            a.on(RoomEvent.Receipt, onReceipt);
            return () => a.off(RoomEvent.Receipt, onReceipt);
        });
        delivered.catch(noop);
        await b.sendReadReceipt(toRead);
        await delivered;
    });

    await check("setRoomReadMarkers: bob's /sync returns m.fully_read at the marked event", async () => {
        assert(toRead, "no message to mark: an earlier check failed");
        const eventId = toRead.getId();
        const synced = waitUntil(`bob's m.fully_read to reach ${eventId}`, b, () =>
            b.getRoom(roomId)?.getAccountData("m.fully_read")?.getContent()?.event_id === eventId,
        );
        await b.setRoomReadMarkers(roomId, eventId);
        await synced;
    });

    await check("setRoomTag then deleteRoomTag: GET tags has m.favourite (order 0.5), then not", async () => {
        await b.setRoomTag(roomId, "m.favourite", { order: 0.5 });
        const { tags } = await b.getRoomTags(roomId);
        assertEqual(tags?.["m.favourite"]?.order, 0.5, "m.favourite's order after setRoomTag");
        await b.deleteRoomTag(roomId, "m.favourite");
        const { tags: after } = await b.getRoomTags(roomId);
        assert(after && !("m.favourite" in after), `tags after deleteRoomTag: ${safeJson(after)}`);
    });

    await check("fetchRoomEvent (GET /rooms/{roomId}/event/{eventId}) returns alice's message", async () => {
        const event = await b.fetchRoomEvent(roomId, aliceMessage.getId());
        assertEqual(event?.event_id, aliceMessage.getId(), "event_id");
        assertEqual(event?.sender, alice.userId, "sender");
        assertEqual(event?.content?.body, aliceMessage.getContent().body, "content.body");
    });

    await check("getEventTimeline on a fresh timeline set (GET /context) returns alice's message with the events around it", async () => {
        // A new timeline set knows no events, so the SDK has to ask the server.
        const timelineSet = new EventTimelineSet(b.getRoom(roomId), { timelineSupport: true }, b);
        const before = sdkRequests.length;
        const timeline = await b.getEventTimeline(timelineSet, aliceMessage.getId());
        assert(
            sdkRequests.slice(before).some((r) => r.method === "GET" && r.path.includes("/context/")),
            "getEventTimeline made no /context request",
        );
        const ids = timeline?.getEvents().map((event) => event.getId()) ?? [];
        assert(ids.includes(aliceMessage.getId()), `the timeline ${safeJson(ids)} lacks alice's message`);
        assert(ids.length > 1, `/context returned no events around alice's message: ${safeJson(ids)}`);
    });

    await check("/messages backwards from the end (createMessagesRequest) has alice's message and the room's m.room.create", async () => {
        const response = await b.createMessagesRequest(roomId, null, 100, Direction.Backward);
        const chunk = response?.chunk ?? [];
        assert(chunk.some((e) => e.event_id === aliceMessage.getId()), "alice's message is not in the chunk");
        assert(chunk.some((e) => e.type === "m.room.create"), "m.room.create is not in the chunk");
    });

    await check("setRoomTopic: getStateEvent returns the new topic and bob's /sync delivers it", async () => {
        const topic = `a new topic (${suffix})`;
        const synced = waitUntil(`bob to see the topic ${JSON.stringify(topic)}`, b, () =>
            b.getRoom(roomId)?.currentState.getStateEvents("m.room.topic", "")?.getContent()?.topic === topic,
        );
        await a.setRoomTopic(roomId, topic);
        const content = await a.getStateEvent(roomId, "m.room.topic", "");
        assertEqual(content?.topic, topic, "topic from getStateEvent");
        await synced;
    });

    await check("redactEvent: the message fetched back is redacted, with redacted_because", async () => {
        const { event_id: eventId } = await a.sendTextMessage(roomId, "to be redacted");
        const { event_id: redactionId } = await a.redactEvent(roomId, eventId, undefined, { reason: "interop" });
        assert(redactionId?.startsWith("$"), `redactEvent returned event_id ${redactionId}`);
        const event = await b.fetchRoomEvent(roomId, eventId);
        assertEqual(safeJson(event?.content), "{}", "content of the redacted message");
        assertEqual(event?.unsigned?.redacted_because?.event_id, redactionId, "unsigned.redacted_because.event_id");
    });

    await check("createAlias: getRoomIdForAlias resolves it to the room and getLocalAliases lists it", async () => {
        await a.createAlias(alias, roomId);
        const { room_id: resolved } = await b.getRoomIdForAlias(alias);
        assertEqual(resolved, roomId, `room of ${alias}`);
        const { aliases } = await a.getLocalAliases(roomId);
        assert(aliases?.includes(alias), `getLocalAliases returned ${safeJson(aliases)}`);
    });

    await check("setRoomDirectoryVisibility public: the room is public and publicRooms lists it (GET, and POST with a search)", async () => {
        await a.setRoomDirectoryVisibility(roomId, "public");
        const { visibility } = await b.getRoomDirectoryVisibility(roomId);
        assertEqual(visibility, "public", "GET /directory/list/room visibility");
        const listed = (await b.publicRooms({ limit: 10 })).chunk ?? [];
        const entry = listed.find((room) => room.room_id === roomId);
        assert(entry, `GET /publicRooms does not list the room: ${safeJson(listed)}`);
        assertEqual(entry.name, "js-sdk interop", "the room's name in /publicRooms");
        const found = (await b.publicRooms({ limit: 10, filter: { generic_search_term: "js-sdk interop" } })).chunk ?? [];
        assert(found.some((room) => room.room_id === roomId), `POST /publicRooms search does not find the room: ${safeJson(found)}`);
        const none = (await b.publicRooms({ limit: 10, filter: { generic_search_term: `no such room ${suffix}` } })).chunk ?? [];
        assert(!none.some((room) => room.room_id === roomId), "POST /publicRooms search for another name finds the room");
    });

    await checkMissing("getRoomHierarchy", README_MISSING.hierarchy, async () => {
        const response = await b.getRoomHierarchy(roomId);
        assert(response?.rooms?.some((room) => room.room_id === roomId), `getRoomHierarchy returned ${safeJson(response)}`);
    });

    await check("room summary (getRoomSummary, unstable MSC3266, not in the README) is refused with 404 M_UNRECOGNIZED", () =>
        assertUnrecognized("getRoomSummary", () => b.getRoomSummary(roomId)),
    );

    await checkMissing("searchUserDirectory", README_MISSING.userDirectory, async () => {
        const response = await a.searchUserDirectory({ term: bob.localpart });
        assert(Array.isArray(response?.results), `searchUserDirectory returned ${safeJson(response)}`);
    });

    await checkMissing("getOpenIdToken", README_MISSING.openId, async () => {
        const response = await a.getOpenIdToken();
        assert(typeof response?.access_token === "string", `getOpenIdToken returned ${safeJson(response)}`);
    });

    await check("turnServer (GET /voip/turnServer) answers {}: no TURN server is configured", async () => {
        assertEqual(safeJson(await a.turnServer()), "{}", "turnServer response");
    });

    await check("getThirdpartyProtocols answers {}: no application service is registered", async () => {
        assertEqual(safeJson(await a.getThirdpartyProtocols()), "{}", "getThirdpartyProtocols response");
    });

    for (const [route, authenticated] of [["legacy /_matrix/media/v3", false], ["authenticated /_matrix/client/v1/media", true]]) {
        await check(`getMediaConfig (${route}): m.upload.size is the configured max_upload_size`, async () => {
            const config = await a.getMediaConfig(authenticated);
            assertEqual(config?.["m.upload.size"], MAX_UPLOAD_SIZE_BYTES, "m.upload.size");
        });
    }

    let mxc = null;
    await check("uploadContent returns an mxc:// URI", async () => {
        const response = await a.uploadContent(Buffer.from(`hello ${suffix}`), {
            type: "text/plain",
            name: "hello.txt",
        });
        assert(response?.content_uri?.startsWith("mxc://"), `uploadContent returned ${safeJson(response)}`);
        mxc = response.content_uri;
    });
    await check("bob downloads the upload via mxcUrlToHttp (authenticated media)", () =>
        download(b, mxc, true, `hello ${suffix}`),
    );
    await check("bob downloads the upload via mxcUrlToHttp (legacy media)", () =>
        download(b, mxc, false, `hello ${suffix}`),
    );

    await check("leave: bob's joined_rooms no longer has the room and alice's /sync shows him left", async () => {
        const synced = waitUntil("alice to see bob left", a, () =>
            a.getRoom(roomId)?.getMember(bob.userId)?.membership === "leave",
        );
        await b.leave(roomId);
        const { joined_rooms: joined } = await b.getJoinedRooms();
        assert(!joined?.includes(roomId), `bob's joined_rooms still has the room: ${safeJson(joined)}`);
        await synced;
    });
}

async function download(client, mxc, authenticated, expectedText) {
    assert(mxc, "nothing to download: the upload failed");
    const url = client.mxcUrlToHttp(mxc, undefined, undefined, undefined, false, true, authenticated);
    const headers = authenticated ? { Authorization: `Bearer ${client.getAccessToken()}` } : {};
    const res = await fetch(url, { headers });
    const text = await res.text();
    assert(res.ok, `GET ${new URL(url).pathname} -> HTTP ${res.status} ${text.slice(0, 200)}`);
    assertEqual(text, expectedText, "downloaded content");
}

function shortError(error) {
    if (error && error.httpStatus !== undefined) {
        return `HTTP ${error.httpStatus} ${error.errcode ?? ""} ${error.data?.error ?? error.message ?? ""}`.trim();
    }
    return String(error?.message ?? error).split("\n")[0].slice(0, 300);
}

function printNotImplemented() {
    if (notImplemented.length === 0) return;
    console.log(`Endpoints the README lists as missing (reported, not failed on):`);
    for (const { name, feature, works } of notImplemented) {
        const outcome = works ? "works" : "not implemented (listed as missing in README)";
        console.log(`  ${name} ["${feature}"]: ${outcome}`);
    }
}

/** Prints what the server answered with an error and returns the unexplained ones. */
function printErrorReport(report) {
    const { seen, groups, networkErrors } = report;
    console.log(
        `\nRequests the server logged: ${seen}; made by matrix-js-sdk: ${sdkRequests.length}` +
            (seen === 0 ? " (no request lines: run the server with tower_http=debug in RUST_LOG)" : ""),
    );
    printSdkWarnings();
    printNotImplemented();
    if (groups.length === 0 && networkErrors.length === 0) {
        console.log("Endpoints that answered with an error: none");
        return [];
    }
    console.log("Endpoints that answered with an error:");
    groups.sort((a, b) => a.path.localeCompare(b.path) || a.method.localeCompare(b.method));
    const unexplained = [];
    for (const g of groups) {
        const errcodes = g.errcodes.size ? ` ${[...g.errcodes].join(", ")}` : "";
        const times = g.count > 1 ? ` x${g.count}` : "";
        const phases = g.phases.size ? [...g.phases].join(", ") : "not by the SDK";
        const line = `${g.status}${errcodes}  ${g.method} ${g.path}  (${phases}${times})`;
        console.log(`  ${line}  [${g.explained ?? "UNEXPLAINED: fails the run"}]`);
        if (!g.explained) unexplained.push(line);
    }
    for (const r of networkErrors) {
        const line = `network error  ${r.method} ${normalizePath(r.path)}: ${r.error}`;
        console.log(`  ${line}  [UNEXPLAINED: fails the run]`);
        unexplained.push(line);
    }
    return unexplained;
}

// What some SDK log lines mean: most say nothing about the server.
const SDK_LOG_NOTES = [
    [
        /^error: Got room state event for unknown room /,
        "SDK-internal: MatrixRTC sees a brand-new room's state before the sync code stores the room",
    ],
    [
        /^warn: Adding default global \w+ push rule \.org\.matrix\.msc/,
        "SDK-internal: the SDK adds this unstable rule itself when the server has none",
    ],
    [
        /^warn: Missing default global \w+ push rule \.m\.rule\.(contains_display_name|roomnotif|contains_user_name)$/,
        "server: its default rules lack this legacy mention rule (deprecated in v1.7, removed by MSC4210); the SDK adds it locally",
    ],
];

function printSdkWarnings() {
    if (sdkWarnings.size === 0) return;
    console.log("matrix-js-sdk warnings and errors (reported, not failed on):");
    for (const [text, count] of sdkWarnings) {
        const firstLine = text.split("\n")[0].slice(0, 300);
        const known = SDK_LOG_NOTES.find(([pattern]) => pattern.test(text));
        const note = known ? ` [${known[1]}]` : "";
        console.log(`  ${firstLine}${count > 1 ? ` (x${count})` : ""}${note}`);
    }
}

// Safety nets: never leave the server running, and record (not crash on) stray rejections: a
// rejection nobody handled is an error nobody checked, so it fails the run.
const unhandledRejections = [];
process.on("exit", () => liveServer?.proc?.kill("SIGKILL"));
process.on("unhandledRejection", (reason) => {
    unhandledRejections.push(describeError(reason).split("\n")[0]);
});

let ok = false;
try {
    ok = await main();
} catch (error) {
    console.log(`FAIL ${describeError(error)}`);
}
if (unhandledRejections.length > 0) {
    record(
        "no promise rejection went unhandled",
        performance.now(),
        new CheckFailed(unhandledRejections.join("\n")),
    );
    ok = false;
}
const passed = results.filter((r) => r.ok).length;
const failedChecks = results.filter((r) => !r.ok);
// A failure outside any step or check (no binary, say) still counts as one.
const failed = ok && failedChecks.length === 0 ? 0 : Math.max(failedChecks.length, 1);
const missing = notImplemented.filter((r) => !r.works).length;
const seconds = ((performance.now() - runStart) / 1000).toFixed(1);
console.log(`\nmatrix-js-sdk interop finished in ${seconds} s`);
if (failedChecks.length > 0) {
    console.log("Failed:");
    for (const r of failedChecks) console.log(`  ${r.name}: ${describeError(r.error).split("\n")[0]}`);
}
console.log(
    `interop: ${passed} passed, ${failed} failed, ${missing} not implemented (listed as missing in README)`,
);
// Exit explicitly: stopped clients can leave timers behind that would keep Node alive.
process.exit(failed === 0 ? 0 : 1);
