"""People: who signs in (OpenID Connect), what they may see and change (roles), and the keys they get for
themselves (device authorization for command-line tools). The tables behind it are in proxy/ledger/ (people,
web_sessions, device_grants, key_admin); the pages and endpoints in proxy/surfaces/."""
