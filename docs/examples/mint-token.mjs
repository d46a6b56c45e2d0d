#!/usr/bin/env node
// Mints a Haven join token the way a scheduling system would, with Node's built-in crypto
// (no packages). Ed25519 ("EdDSA"); the private key is a PKCS#8 PEM file.
//
//   node mint-token.mjs <private-key.pem> <session-id> <role> <subject> [minutes]
//
// With Haven's development key (haven-data/dev-signing-key.pem) the issuer is "haven-dev".
// Prints the token; the join link is <public url>/join#token=<token>.
import { createPrivateKey, randomUUID, sign } from 'node:crypto';
import { readFileSync } from 'node:fs';

const [keyFile, sessionId, role, subject, minutes = '60'] = process.argv.slice(2);
if (!keyFile || !sessionId || !role || !subject) {
  console.error('usage: node mint-token.mjs <private-key.pem> <session-id> <role> <subject> [minutes]');
  process.exit(2);
}

const b64url = (buf) => Buffer.from(buf).toString('base64url');
const now = Math.floor(Date.now() / 1000);
const startsAt = new Date(now * 1000);
const endsAt = new Date((now + Number(minutes) * 60) * 1000);

const header = { alg: 'EdDSA', typ: 'JWT' };
const claims = {
  iss: process.env.HAVEN_ISSUER ?? 'haven-dev',
  aud: 'haven',
  sub: subject,
  role,
  jti: randomUUID(),
  iat: now,
  nbf: now,
  // Valid until 15 minutes after the session's scheduled end.
  exp: Math.floor(endsAt.getTime() / 1000) + 15 * 60,
  session: {
    id: sessionId,
    kind: 'group',
    starts_at: startsAt.toISOString(),
    ends_at: endsAt.toISOString(),
    program: 'iop-adult',
  },
};

const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
const key = createPrivateKey(readFileSync(keyFile));
const signature = sign(null, Buffer.from(signingInput), key);
console.log(`${signingInput}.${b64url(signature)}`);
