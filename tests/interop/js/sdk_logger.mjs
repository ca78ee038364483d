// Quiets matrix-js-sdk's logger, which logs at debug level by default. Imported by the test
// before matrix-js-sdk itself: some SDK modules bind the logger's methods once, when they load.
//
// Warnings and errors are not printed but counted in `sdkWarnings` ("level: message" -> count),
// for the test's report. Loggers made later by getChild() copy the parent's methodFactory, so
// replacing it (rather than only setting a level) quiets them too.

import { logger } from "matrix-js-sdk/lib/logger.js";

const noop = () => {};

export const sdkWarnings = new Map();

export function safeJson(value) {
    try {
        return JSON.stringify(value);
    } catch {
        return String(value);
    }
}

function describe(arg) {
    if (arg instanceof Error) return arg.message;
    return typeof arg === "string" ? arg : safeJson(arg);
}

logger.methodFactory = (methodName) => {
    if (methodName !== "warn" && methodName !== "error") return noop;
    return (...args) => {
        const key = `${methodName}: ${args.map(describe).join(" ")}`;
        sdkWarnings.set(key, (sdkWarnings.get(key) ?? 0) + 1);
    };
};
logger.setLevel("warn", false);
logger.rebuild();
