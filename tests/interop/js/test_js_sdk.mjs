// Interop test: matrix-js-sdk (the SDK behind Element Web) against a real Switchboard binary.
//
// Starts the server on a free loopback port in a temporary directory (the same homeserver.yaml
// keys as tests/interop/conftest.py), registers two users over plain HTTP, then drives both with
// matrix-js-sdk: password login, startClient() until the sync state is PREPARED, one creates a
// public room, the other joins, and each must see the other's message arrive through
// `Room.timeline`.
//
// Then, best effort, it makes a few dozen more of the calls a client such as Element makes
// (profile, tags, receipts, aliases, media, ...). At the end it lists every request the server
// answered with an error (from the server's own request log, with the errcode the SDK saw), the
// SDK's warnings, and which further calls failed. Those are reported, not failed on: they show
// which endpoints Switchboard does not serve yet.
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
// Exits 0 when every step passed, 1 otherwise; the last line reads "interop: N passed, N failed".

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { accessSync, constants as fsConstants, createWriteStream } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import pg from "pg";

// First: quiets the SDK's logger before the SDK's own modules bind to its methods.
import { safeJson, sdkWarnings } from "./sdk_logger.mjs";
import {
    ClientEvent,
    EventType,
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

// ---------------------------------------------------------------------------------------------
// Steps and assertions

const noop = () => {};

class CheckFailed extends Error {}

function check(condition, message) {
    if (!condition) throw new CheckFailed(message);
}

function checkEqual(actual, expected, what) {
    check(
        actual === expected,
        `${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`,
    );
}

const results = []; // {name, ok, ms, error}
const runStart = performance.now();

async function step(name, fn) {
    const start = performance.now();
    try {
        const value = await fn();
        const ms = Math.round(performance.now() - start);
        results.push({ name, ok: true, ms });
        console.log(`ok   ${name} (${ms} ms)`);
        return value;
    } catch (error) {
        const ms = Math.round(performance.now() - start);
        results.push({ name, ok: false, ms, error });
        console.log(`FAIL ${name} (${ms} ms)`);
        console.log(indent(describeError(error)));
        throw error;
    }
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
    check(
        res.status === 200,
        `POST ${url} ${JSON.stringify(request)}\n-> HTTP ${res.status} ${text}`,
    );
    const body = JSON.parse(text);
    checkEqual(body.user_id, `@${localpart}:${SERVER_NAME}`, "register user_id");
    return body;
}

// ---------------------------------------------------------------------------------------------
// What the SDK asked for: every request through fetchFn, so errors can be listed with errcodes.

const sdkRequests = []; // {who, phase, method, path, status, errcode, error}
let stopping = false;
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
            entry.status = stopping && error?.name === "AbortError" ? "aborted" : "network error";
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

// Errors that are the right answer from this server.
const EXPECTED_ENDPOINT_ERRORS = [
    [/\/org\.matrix\.msc2965\/auth_(metadata|issuer)$/, "no OIDC-native auth (MSC2965/MSC3861)"],
];

function errorReport(logText) {
    const groups = new Map(); // "METHOD path status" -> {method, path, status, count, errcodes}
    let seen = 0;
    for (const line of logText.split("\n")) {
        const match = REQUEST_LINE.exec(line);
        if (!match) continue;
        seen++;
        const [, method, uri, statusText] = match;
        const status = Number(statusText);
        if (status < 400) continue;
        const path = normalizePath(uri);
        const key = `${method} ${path} ${status}`;
        const group = groups.get(key) ?? {
            method,
            path,
            status,
            count: 0,
            errcodes: new Set(),
            phases: new Set(),
        };
        group.count++;
        groups.set(key, group);
    }
    // The errcode each error carried, as the SDK saw it.
    for (const request of sdkRequests) {
        if (typeof request.status !== "number" || request.status < 400) continue;
        const key = `${request.method} ${normalizePath(request.path)} ${request.status}`;
        const group = groups.get(key);
        if (!group) continue;
        if (request.errcode) group.errcodes.add(request.errcode);
        group.phases.add(request.phase);
    }
    return { seen, groups: [...groups.values()] };
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
    try {
        await step("server answers /_matrix/client/versions", () => server.start());
        await runFlow(server.url);
    } catch (error) {
        flowError = error;
    } finally {
        stopping = true;
        for (const client of clients) {
            try {
                client.stopClient();
            } catch (error) {
                console.log(`stopClient failed: ${describeError(error)}`);
            }
        }
        if (server.running) {
            try {
                await step("server exits on SIGTERM", () => server.stop());
            } catch (error) {
                flowError ??= error;
            }
        }
        try {
            await server.database?.drop();
        } catch (error) {
            flowError ??= error;
        }
    }

    const logText = await server.logText();
    printErrorReport(logText);

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
        checkEqual(response.user_id, alice.userId, "alice's login user_id");
        check(response.access_token, "alice's login returned no access_token");
        check(response.device_id, "alice's login returned no device_id");
        alice.credentials = response;
    });
    await step('bob logs in with login("m.login.password")', async () => {
        const response = await newClient(hsUrl, "bob-login").login("m.login.password", {
            identifier: { type: "m.id.user", user: bob.localpart },
            password: PASSWORD,
            initial_device_display_name: "matrix-js-sdk interop",
        });
        checkEqual(response.user_id, bob.userId, "bob's login user_id");
        check(response.access_token, "bob's login returned no access_token");
        check(response.device_id, "bob's login returned no device_id");
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
            checkEqual(whoami.user_id, user.userId, `${user.name}'s whoami user_id`);
            checkEqual(whoami.device_id, user.credentials.device_id, `${user.name}'s whoami device_id`);
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
        check(
            typeof response.room_id === "string" && response.room_id.startsWith("!"),
            `createRoom returned ${JSON.stringify(response)}`,
        );
        await waitForJoined(alice.client, "alice", response.room_id, alice.userId);
        return response.room_id;
    });

    await step("bob joins the room", async () => {
        const room = await bob.client.joinRoom(roomId);
        checkEqual(room.roomId, roomId, "joinRoom's room");
        await waitForJoined(bob.client, "bob", roomId, bob.userId);
        await waitForJoined(alice.client, "alice", roomId, bob.userId);
        const name = bob.client.getRoom(roomId)?.name;
        checkEqual(name, "js-sdk interop", "room name bob sees");
    });

    const aliceMessage = await step("bob receives alice's sendTextMessage() via Room.timeline", async () => {
        const body = `hello bob, from alice (${suffix})`;
        const received = waitForMessage(bob.client, "bob", roomId, alice.userId, body);
        const sent = await alice.client.sendTextMessage(roomId, body);
        check(sent?.event_id?.startsWith("$"), `sendTextMessage returned ${JSON.stringify(sent)}`);
        const event = await received;
        checkEqual(event.getId(), sent.event_id, "event ID bob received");
        checkEqual(event.getContent().msgtype, MsgType.Text, "msgtype bob received");
        return event;
    });

    await step("alice receives bob's sendMessage() via Room.timeline", async () => {
        const body = `hello alice, from bob (${suffix})`;
        const received = waitForMessage(alice.client, "alice", roomId, bob.userId, body);
        const sent = await bob.client.sendMessage(roomId, { msgtype: MsgType.Text, body });
        check(sent?.event_id?.startsWith("$"), `sendMessage returned ${JSON.stringify(sent)}`);
        const event = await received;
        checkEqual(event.getId(), sent.event_id, "event ID alice received");
    });

    await extraCalls({ alice, bob, roomId, aliceMessage, suffix });
}

// ---------------------------------------------------------------------------------------------
// More of what a client such as Element asks for, once the core flow works. Best effort: each
// call's outcome is reported at the end, none fails the run (the errors also appear in the
// server-side list). `expected` marks an error that is the right answer from this server.

const EXTRA_TIMEOUT_MS = 5_000;
const extraResults = []; // {label, ok, detail, expected}

async function extraCalls({ alice, bob, roomId, aliceMessage, suffix }) {
    const a = alice.client;
    const b = bob.client;
    const alias = `#js_interop_${suffix}:${SERVER_NAME}`;
    let mxc;
    phase = "further calls";
    const calls = [
        ["GET /login (loginFlows)", () => a.loginFlows()],
        [
            "OIDC discovery (getAuthMetadata)",
            () => a.getAuthMetadata(),
            "404 M_UNRECOGNIZED is right for a server without OIDC (MSC2965/MSC3861)",
        ],
        ["getProfileInfo", () => a.getProfileInfo(bob.userId)],
        ["setDisplayName", () => a.setDisplayName("Alice Interop")],
        ["getDevices", () => a.getDevices()],
        ["getPushers", () => a.getPushers()],
        ["getJoinedRooms", () => a.getJoinedRooms()],
        ["getThreePids", () => a.getThreePids()],
        ["setAccountData", () => a.setAccountData("org.switchboard.interop", { suffix })],
        ["getAccountDataFromServer", () => a.getAccountDataFromServer("org.switchboard.interop")],
        ["setPresence", () => a.setPresence({ presence: "online", status_msg: "testing" })],
        ["sendTyping", () => b.sendTyping(roomId, true, 3000)],
        ["sendReadReceipt", () => b.sendReadReceipt(aliceMessage)],
        ["setRoomReadMarkers", () => b.setRoomReadMarkers(roomId, aliceMessage.getId(), aliceMessage)],
        ["setRoomTag", () => b.setRoomTag(roomId, "m.favourite", { order: 0.5 })],
        ["deleteRoomTag", () => b.deleteRoomTag(roomId, "m.favourite")],
        ["setRoomTopic", () => a.setRoomTopic(roomId, "a new topic")],
        ["getStateEvent", () => a.getStateEvent(roomId, "m.room.topic", "")],
        ["fetchRoomEvent", () => b.fetchRoomEvent(roomId, aliceMessage.getId())],
        [
            "getEventTimeline (/context)",
            () => b.getEventTimeline(b.getRoom(roomId).getUnfilteredTimelineSet(), aliceMessage.getId()),
        ],
        ["scrollback (/messages)", () => b.scrollback(b.getRoom(roomId), 30)],
        [
            "redactEvent",
            async () => {
                const { event_id: eventId } = await a.sendTextMessage(roomId, "to be redacted");
                return a.redactEvent(roomId, eventId, undefined, { reason: "interop" });
            },
        ],
        ["createAlias", () => a.createAlias(alias, roomId)],
        ["getRoomIdForAlias", () => b.getRoomIdForAlias(alias)],
        ["getLocalAliases", () => a.getLocalAliases(roomId)],
        ["publicRooms", () => b.publicRooms({ limit: 10 })],
        ["getRoomHierarchy", () => b.getRoomHierarchy(roomId)],
        ["getRoomSummary (MSC3266, unstable)", () => b.getRoomSummary(roomId)],
        ["searchUserDirectory", () => a.searchUserDirectory({ term: bob.localpart })],
        ["getOpenIdToken", () => a.getOpenIdToken()],
        ["turnServer", () => a.turnServer()],
        ["getThirdpartyProtocols", () => a.getThirdpartyProtocols()],
        ["getMediaConfig (legacy /_matrix/media/v3)", () => a.getMediaConfig(false)],
        ["getMediaConfig (authenticated /_matrix/client/v1/media)", () => a.getMediaConfig(true)],
        [
            "uploadContent",
            async () => {
                const response = await a.uploadContent(Buffer.from(`hello ${suffix}`), {
                    type: "text/plain",
                    name: "hello.txt",
                });
                mxc = response.content_uri;
                check(mxc?.startsWith("mxc://"), `uploadContent returned ${JSON.stringify(response)}`);
            },
        ],
        [
            "download via mxcUrlToHttp (authenticated media)",
            () => download(b, mxc, true, `hello ${suffix}`),
        ],
        [
            "download via mxcUrlToHttp (legacy media)",
            () => download(b, mxc, false, `hello ${suffix}`),
        ],
        ["leave", () => b.leave(roomId)],
    ];
    for (const [label, call, expected] of calls) {
        try {
            await waitFor(label, EXTRA_TIMEOUT_MS, (ok, fail) => {
                Promise.resolve().then(call).then(ok, fail);
            });
            extraResults.push({ label, ok: true });
        } catch (error) {
            extraResults.push({ label, ok: false, detail: shortError(error), expected });
        }
    }
}

async function download(client, mxc, authenticated, expectedText) {
    check(mxc, "nothing was uploaded");
    const url = client.mxcUrlToHttp(mxc, undefined, undefined, undefined, false, true, authenticated);
    const headers = authenticated ? { Authorization: `Bearer ${client.getAccessToken()}` } : {};
    const res = await fetch(url, { headers });
    const text = await res.text();
    check(res.ok, `GET ${new URL(url).pathname} -> HTTP ${res.status} ${text.slice(0, 200)}`);
    checkEqual(text, expectedText, "downloaded content");
}

function shortError(error) {
    if (error && error.httpStatus !== undefined) {
        return `HTTP ${error.httpStatus} ${error.errcode ?? ""} ${error.data?.error ?? error.message ?? ""}`.trim();
    }
    return String(error?.message ?? error).split("\n")[0].slice(0, 300);
}

function printExtraResults() {
    if (extraResults.length === 0) return;
    const failed = extraResults.filter((r) => !r.ok);
    console.log(
        `Further SDK calls (best effort, not failed on): ${extraResults.length - failed.length} ok, ` +
            `${failed.length} with an error${failed.length ? ":" : ""}`,
    );
    for (const r of failed) {
        console.log(`  ${r.label}: ${r.detail}${r.expected ? ` [expected: ${r.expected}]` : ""}`);
    }
}

function printErrorReport(logText) {
    const { seen, groups } = errorReport(logText);
    const sdkErrors = sdkRequests.filter(
        (r) => r.status === "network error" || (typeof r.status === "number" && r.status >= 400),
    );
    console.log(
        `\nRequests the server logged: ${seen}; made by matrix-js-sdk: ${sdkRequests.length}` +
            (seen === 0 ? " (no request lines: run the server with tower_http=debug in RUST_LOG)" : ""),
    );
    const coreRequests = sdkRequests.filter((r) => r.phase === "core flow");
    const coreErrors = coreRequests.filter((r) => typeof r.status !== "number" || r.status >= 400);
    const aborted = coreErrors.filter((r) => r.status === "aborted").length;
    console.log(
        `Core flow: ${coreRequests.length} SDK requests, ${coreErrors.length - aborted} answered with an error` +
            (aborted ? ` (and ${aborted} long-poll /sync aborted by stopClient)` : ""),
    );
    printSdkWarnings();
    printExtraResults();
    if (groups.length === 0 && sdkErrors.length === 0) {
        console.log("Endpoints that answered with an error: none");
        return;
    }
    console.log("Endpoints that answered with an error (reported, not failed on):");
    groups.sort((a, b) => a.path.localeCompare(b.path) || a.method.localeCompare(b.method));
    for (const g of groups) {
        const errcodes = g.errcodes.size ? ` ${[...g.errcodes].join(", ")}` : "";
        const times = g.count > 1 ? ` x${g.count}` : "";
        const phases = g.phases.size ? [...g.phases].join(", ") : "not by the SDK";
        const expected = EXPECTED_ENDPOINT_ERRORS.find(([pattern]) => pattern.test(g.path));
        const note = expected ? ` [expected: ${expected[1]}]` : "";
        console.log(`  ${g.status}${errcodes}  ${g.method} ${g.path}  (${phases}${times})${note}`);
    }
    for (const r of sdkErrors.filter((r) => r.status === "network error")) {
        console.log(`  network error  ${r.method} ${normalizePath(r.path)}: ${r.error}`);
    }
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

// Safety nets: never leave the server running, and report (not crash on) stray rejections.
process.on("exit", () => liveServer?.proc?.kill("SIGKILL"));
process.on("unhandledRejection", (reason) => {
    const key = `unhandled rejection: ${describeError(reason).split("\n")[0]}`;
    sdkWarnings.set(key, (sdkWarnings.get(key) ?? 0) + 1);
});

let ok = false;
try {
    ok = await main();
} catch (error) {
    console.log(`FAIL ${describeError(error)}`);
}
const passed = results.filter((r) => r.ok).length;
const failedSteps = results.length - passed;
// A failure outside any step (no binary, say) still counts as one.
const failed = ok ? 0 : Math.max(failedSteps, 1);
const seconds = ((performance.now() - runStart) / 1000).toFixed(1);
console.log(`\nmatrix-js-sdk interop finished in ${seconds} s`);
console.log(`interop: ${passed} passed, ${failed} failed`);
// Exit explicitly: stopped clients can leave timers behind that would keep Node alive.
process.exit(ok ? 0 : 1);
