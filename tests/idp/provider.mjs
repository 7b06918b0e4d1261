// A real OpenID Connect provider (panva's oidc-provider) on loopback, for spendgate's tests: see tests/idp.py.
//
//   IDP_PORT=0 IDP_CONFIG=/path/config.json node tests/idp/provider.mjs
//
// IDP_PORT: the port on 127.0.0.1 (0: one the OS picks). The issuer is http://127.0.0.1:<port>, printed as
// `READY <issuer>` on stdout once listening (the only line written to stdout). IDP_CONFIG: a JSON file
//
//   {"clients": [{"client_id", "client_secret", "redirect_uris": [...],
//                 "token_endpoint_auth_method"?: "client_secret_basic" (default) | "client_secret_post"}],
//    "accounts": {"<sub>": {"email", "email_verified", "name", "groups": [...]}}}
//
// Authorization code flow only, PKCE (S256) required of every client, id_tokens signed RS256 with a key generated
// at start, and the account's email, email_verified, name and groups in the id_token itself. The sign-in and
// consent pages are oidc-provider's devInteractions: any password is accepted for a login name that is a key of
// "accounts"; any other login name is sent back to the sign-in page (`?unknown_login=<name>`), signed in as nobody.
// Consent is granted without asking (unless the client sends prompt=consent: then the page has a Continue button).
import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import process from 'node:process';
import * as querystring from 'node:querystring';
import { promisify } from 'node:util';

import Provider from 'oidc-provider';

// oidc-provider 9 calls these (Node.js >= 20.18); without them it fails later, mid-request, with a TypeError.
if (typeof URL.parse !== 'function' || typeof crypto.hash !== 'function') {
  console.error(`provider.mjs: oidc-provider 9 needs Node.js >= 20.18, this is ${process.version}`);
  process.exit(2);
}

function required(name) {
  const value = process.env[name];
  if (value === undefined || value === '') {
    console.error(`provider.mjs: set ${name}`);
    process.exit(2);
  }
  return value;
}

const started = performance.now();
const since = () => `${Math.round(performance.now() - started)} ms`;
const config = JSON.parse(readFileSync(required('IDP_CONFIG'), 'utf8'));
const accounts = config.accounts ?? {};
const port = Number.parseInt(required('IDP_PORT'), 10);

// Not generateKeyPairSync: on Node 20 it can deadlock (a GC during the job runs the job's destructor, which waits
// on a mutex the job holds; seen as ~2% of starts hanging forever with the main thread in ~KeyGenJob).
const generateKeyPair = promisify(crypto.generateKeyPair);
const signingKey = {
  ...(await generateKeyPair('rsa', { modulusLength: 2048 })).privateKey.export({ format: 'jwk' }),
  kid: crypto.randomBytes(8).toString('hex'),
  alg: 'RS256',
  use: 'sig',
};

console.error(`provider.mjs: signing key generated (${since()})`);

const clients = (config.clients ?? []).map((client) => ({
  client_id: client.client_id,
  client_secret: client.client_secret,
  redirect_uris: client.redirect_uris,
  // application_type "web" (the default): redirect URIs match exactly, and http://127.0.0.1:<port>/... is accepted
  // for a client of the code flow (oidc-provider insists on https only for implicit-flow web clients).
  application_type: 'web',
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: client.token_endpoint_auth_method ?? 'client_secret_basic',
  id_token_signed_response_alg: 'RS256',
}));

const server = createServer();

server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;

  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: [signingKey] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'email', 'profile', 'groups'],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name'],
      groups: ['groups'],
    },
    // The scopes' claims go into the id_token, not only to the userinfo endpoint.
    conformIdTokenClaims: false,
    responseTypes: ['code'],
    pkce: { required: () => true },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
    enabledJWA: { idTokenSigningAlgValues: ['RS256'] },
    features: {
      devInteractions: { enabled: true },
    },
    // An account the config names; undefined for any other sub (never reached for one: see the middleware below).
    async findAccount(_ctx, sub) {
      if (!Object.hasOwn(accounts, sub)) {
        return undefined;
      }
      const account = accounts[sub];
      return {
        accountId: sub,
        async claims() {
          return {
            sub,
            email: account.email,
            email_verified: account.email_verified ?? true,
            name: account.name,
            groups: account.groups ?? [],
          };
        },
      };
    },
    // Consent skipped: every client is first-party, granted what it asks for (oidc-provider's skip-consent recipe).
    async loadExistingGrant(ctx) {
      const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) {
        return ctx.oidc.provider.Grant.find(grantId);
      }
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope('openid email profile groups');
      await grant.save();
      return grant;
    },
    ttl: {
      // Short: these are tests.
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
      IdToken: 600,
      AccessToken: 600,
      AuthorizationCode: 60,
    },
  });

  provider.use(async (ctx, next) => {
    // The dev sign-in page takes any login name: one that names no account is refused here, before oidc-provider
    // signs it in (its session would then hold an account that findAccount does not know, and every later
    // authorization request from that browser would fail with a server_error). The browser is sent back to the
    // sign-in page, marked `?unknown_login=<name>`, as a real IdP would say "wrong user name or password".
    if (ctx.method === 'POST' && /^\/interaction\/[^/]+$/.test(ctx.path) && ctx.is('application/x-www-form-urlencoded')) {
      const chunks = [];
      for await (const chunk of ctx.req) {
        chunks.push(chunk);
      }
      const body = querystring.parse(Buffer.concat(chunks).toString('utf8'));
      if (body.prompt === 'login' && !Object.hasOwn(accounts, String(body.login))) {
        ctx.redirect(`${ctx.path}?${querystring.stringify({ unknown_login: String(body.login) })}`);
        ctx.status = 303;
        return;
      }
      // oidc-provider reads an already parsed body from here (and says so, once, on stderr).
      ctx.request.body = body;
    }
    await next();
    // The dev pages @import a Google font: nothing leaves loopback from a test's browser.
    if (ctx.response.is('html') && !ctx.response.get('content-security-policy')) {
      ctx.set('content-security-policy', "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:");
    }
  });

  provider.on('server_error', (_ctx, error) => console.error('provider.mjs: server_error', error));

  server.on('request', provider.callback());
  console.error(`provider.mjs: ${issuer} ready (${since()} after start)`);
  process.stdout.write(`READY ${issuer}\n`);
});

server.on('error', (error) => {
  console.error(`provider.mjs: ${error.message}`);
  process.exit(1);
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);
