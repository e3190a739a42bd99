"""Shared test helpers, one module per subject; tests import them as ``support.<module>``.

tests/conftest.py puts tests/ on sys.path (pytest's default "prepend" import mode), so
``from support.x import y`` works in a whole run and in a run of one directory or file.

  ports        free loopback ports for servers started as subprocesses
  wire         the reference wire form: CRLF, final line end, un-stuffing
  maildrop     reading a maildrop or a Maildir back
  crash        the auditor both SIGKILL suites run after every kill
  auth         cheap hash costs and the passwd-file writer's type
  proto        a synchronous stand-in for the asyncio glue around ServerConnection
  pop3service  an in-process Pop3Service on loopback and a raw byte-level client
  scram        SCRAM clients: scramp's, and GNU SASL's gsasl relayed onto a connection
  serverproc   a real `popbox serve` subprocess
  interop      the in-process server that independent POP3 clients are run against
  lmtp         an LmtpService in its own thread, for blocking LMTP clients
  postfix      a private Postfix instance relaying to popbox over LMTP
  pgstore      PostgreSQL mail stores on the test cluster's databases
  dovecot      a private Dovecot POP3 server
  fakepop      a scripted, misbehaving POP3 server for the collector
  fetch        collector accounts, settings, popbox.toml [fetch] files, one poll
  oauth        a local OAuth2 authorization server
  issuer       a local token issuer: signed JWTs, JWKS with rotation, RFC 7662
  webhook      a webhook receiver that checks signatures
  httpsite     loopback HTTP sites that keep every request (trackers, attackers, the trap)
  browser      headless Chromium through chromium-driver, and every request it made
  browser_web  popbox's web page in a thread for Selenium, and a person's steps on it
  browser_mail the messages the browser tests archive, hostile HTML among them
"""
