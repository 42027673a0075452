#!/usr/bin/env python3
"""A deliberately tiny stand-in for mail-tls-proxy, used only to check the
end-to-end harness itself (that the curl, swaks, s_client and Python client
invocations in test_real_servers.py are right) while the real proxy is not
ready.  It is NOT the product and makes no security promises: no command
injection protection, no line limits, no literals, no timeouts.

    MAIL_TLS_PROXY_BIN=tests/e2e/stand_in_proxy.py tests/e2e/run.sh

It accepts the same command line and TOML config as the real binary:
    stand_in_proxy.py run --config FILE
"""

from __future__ import annotations

import argparse
import asyncio
import re
import ssl
import sys
import tomllib
from pathlib import Path

connections_total: dict[str, int] = {}


def tls_server_context(config: dict, config_dir: Path) -> ssl.SSLContext:
    certificate = config["certificate"][0]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config_dir / certificate["cert"], config_dir / certificate["key"])
    return context


async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        sink.close()


async def relay_both_ways(client_reader, client_writer, backend_reader, backend_writer) -> None:
    await asyncio.gather(relay(client_reader, backend_writer), relay(backend_reader, client_writer))


async def smtp_reply(reader: asyncio.StreamReader) -> list[bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("backend closed")
        lines.append(line)
        if line[3:4] != b"-":
            return lines


async def smtp_plaintext_phase(client_reader, client_writer, backend_reader, backend_writer, context) -> bool:
    client_writer.write(b"".join(await smtp_reply(backend_reader)))
    while line := await client_reader.readline():
        verb = line.split(None, 1)[0].upper() if line.strip() else b""
        if verb == b"STARTTLS":
            client_writer.write(b"220 2.0.0 Ready to start TLS\r\n")
            await client_writer.drain()
            await client_writer.start_tls(context)
            return True
        backend_writer.write(line)
        reply = await smtp_reply(backend_reader)
        if verb == b"EHLO" and reply[0].startswith(b"250"):
            reply[-1] = b"250-" + reply[-1][4:]
            reply.append(b"250 STARTTLS\r\n")
        client_writer.write(b"".join(reply))
        if verb == b"QUIT":
            return False
    return False


def add_imap_starttls(line: bytes) -> bytes:
    line = re.sub(rb"\[CAPABILITY ([^\]]*)\]", rb"[CAPABILITY \1 STARTTLS]", line)
    if line.upper().startswith(b"* CAPABILITY "):
        line = line.rstrip(b"\r\n") + b" STARTTLS\r\n"
    return line


async def imap_plaintext_phase(client_reader, client_writer, backend_reader, backend_writer, context) -> bool:
    client_writer.write(add_imap_starttls(await backend_reader.readline()))
    while line := await client_reader.readline():
        parts = line.split(None, 2)
        tag, command = (parts + [b"", b""])[:2]
        if command.upper() == b"STARTTLS":
            client_writer.write(tag + b" OK Begin TLS negotiation now\r\n")
            await client_writer.drain()
            await client_writer.start_tls(context)
            return True
        backend_writer.write(line)
        while reply := await backend_reader.readline():
            client_writer.write(add_imap_starttls(reply))
            if reply.startswith(tag + b" "):
                break
        if command.upper() == b"LOGOUT":
            return False
    return False


async def pop3_plaintext_phase(client_reader, client_writer, backend_reader, backend_writer, context) -> bool:
    client_writer.write(await backend_reader.readline())
    while line := await client_reader.readline():
        verb = line.split(None, 1)[0].upper() if line.strip() else b""
        if verb == b"STLS":
            client_writer.write(b"+OK Begin TLS negotiation\r\n")
            await client_writer.drain()
            await client_writer.start_tls(context)
            return True
        backend_writer.write(line)
        reply = [await backend_reader.readline()]
        if verb == b"CAPA" and reply[0].startswith(b"+OK"):
            while (capability := await backend_reader.readline()) not in (b".\r\n", b""):
                reply.append(capability)
            reply += [b"STLS\r\n", b".\r\n"]
        client_writer.write(b"".join(reply))
        if verb == b"QUIT":
            return False
    return False


PLAINTEXT_PHASES = {"smtp": smtp_plaintext_phase, "imap": imap_plaintext_phase, "pop3": pop3_plaintext_phase}


def connection_handler(listener: dict, context: ssl.SSLContext):
    backend_host, backend_port = listener["backend"].rsplit(":", 1)

    async def handle(client_reader, client_writer):
        connections_total[listener["name"]] += 1
        try:
            backend_reader, backend_writer = await asyncio.open_connection(backend_host, int(backend_port))
        except OSError:
            client_writer.close()
            return
        try:
            if listener["tls"] == "starttls":
                phase = PLAINTEXT_PHASES[listener["protocol"]]
                upgraded = await phase(client_reader, client_writer, backend_reader, backend_writer, context)
                if not upgraded:
                    client_writer.close()
                    backend_writer.close()
                    return
            await relay_both_ways(client_reader, client_writer, backend_reader, backend_writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            client_writer.close()
            backend_writer.close()

    return handle


async def metrics_handler(reader, writer):
    request_line = await reader.readline()
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass
    path = request_line.split()[1].decode() if len(request_line.split()) > 1 else "/"
    if path == "/metrics":
        body = "".join(f'mail_tls_proxy_connections_total{{listener="{name}"}} {count}\n'
                       for name, count in connections_total.items())
        status = "200 OK"
    elif path == "/healthz":
        body, status = "ok\n", "200 OK"
    else:
        body, status = "not found\n", "404 Not Found"
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n{body}".encode())
    await writer.drain()
    writer.close()


async def serve(config_file: Path) -> None:
    config = tomllib.loads(config_file.read_text())
    context = tls_server_context(config, config_file.parent)
    servers = []
    for listener in config["listener"]:
        connections_total[listener["name"]] = 0
        host, port = listener["listen"].rsplit(":", 1)
        servers.append(await asyncio.start_server(
            connection_handler(listener, context), host, int(port),
            ssl=context if listener["tls"] == "implicit" else None))
    metrics_host, metrics_port = config["metrics"]["listen"].rsplit(":", 1)
    servers.append(await asyncio.start_server(metrics_handler, metrics_host, int(metrics_port)))
    print(f"stand-in proxy listening: {[l['listen'] for l in config['listener']]}", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--config", required=True, type=Path)
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.config.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
