// A webhook receiver for outbox-relay in Node.js: verify, deduplicate, answer fast.
//
//     npm ci
//     WEBHOOK_SECRET=whsec_... PORT=8000 node receiver.js
//
// Each request is verified with the `standardwebhooks` package (Standard Webhooks: headers
// webhook-id, webhook-timestamp, webhook-signature; secret whsec_...). A request that does
// not verify gets 401 (400 when the headers are missing) and is not processed.
//
// The relay delivers at least once: after a relay crash, an expired lease or an operator's
// replay, the same event comes again with the same webhook-id (its event_id). This example
// remembers processed ids in memory, which a restart forgets. A real receiver stores them
// durably, in the same transaction as the event's work: e.g. a table with a UNIQUE
// constraint on webhook_id and `INSERT ... ON CONFLICT DO NOTHING`, processing the event
// only when the insert added a row (see ../python/receiver.py, which does that in SQLite).
//
// Answer fast: the relay waits for the answer (15 s timeout by default) and counts the
// request against the subscription's max_in_flight meanwhile. Queue slow work and answer.
//
// Environment: WEBHOOK_SECRET (required), PORT (default 8000; 0 = any free port), HOST
// (default 127.0.0.1). Prints one line per request: processed / duplicate / refused.

import http from "node:http";
import { Webhook, WebhookVerificationError } from "standardwebhooks";

const MAX_BODY = 2 * 1024 * 1024; // the relay's payload limit is 1 MiB by default, plus the envelope
const REQUIRED_HEADERS = ["webhook-id", "webhook-timestamp", "webhook-signature"];

const secret = process.env.WEBHOOK_SECRET;
if (!secret) {
  console.error("set WEBHOOK_SECRET to the subscription's whsec_... secret");
  process.exit(2);
}
const webhook = new Webhook(secret);
const processed = new Set(); // in memory for the example only: see above

function answer(res, status) {
  res.writeHead(status, { "content-length": "0" });
  res.end();
}

function handle(req, res, body) {
  const webhookId = req.headers["webhook-id"] ?? "-";
  if (!REQUIRED_HEADERS.every((name) => req.headers[name])) {
    console.log(`refused 400 ${webhookId} missing webhook headers`);
    return answer(res, 400);
  }
  // Verify before anything else, the dedupe included: a forged request carrying a real
  // event's id must not mark that event as processed.
  let event;
  try {
    event = webhook.verify(body.toString("utf8"), req.headers);
  } catch (error) {
    // WebhookVerificationError, or a body that is not JSON: the sender's fault, 401.
    const why = error instanceof WebhookVerificationError ? error.message : `bad body: ${error.message}`;
    console.log(`refused 401 ${webhookId} ${why}`);
    return answer(res, 401);
  }
  if (processed.has(webhookId)) {
    console.log(`duplicate ${webhookId} ${event.event_type}`);
    return answer(res, 204); // any 2xx acknowledges, duplicates included
  }
  processed.add(webhookId);
  // The event's work goes here (or onto a queue, to answer sooner).
  console.log(`processed ${webhookId} ${event.event_type}`);
  answer(res, 204);
}

const server = http.createServer((req, res) => {
  if (req.method !== "POST" || req.url.split("?")[0] !== "/webhooks") {
    return answer(res, 404);
  }
  const chunks = [];
  let size = 0;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY) {
      answer(res, 413);
      req.destroy();
      return;
    }
    chunks.push(chunk);
  });
  req.on("end", () => {
    if (!res.writableEnded) handle(req, res, Buffer.concat(chunks));
  });
});

server.listen(Number(process.env.PORT ?? 8000), process.env.HOST ?? "127.0.0.1", () => {
  const { address, port } = server.address();
  console.log(`listening on http://${address}:${port}/webhooks`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(0));
}
