"""Peers of the accelerator's data-integrity tests: the socket kinds the issue saw break.

  peers.py serve NAME [NAMED_PORT] every server below, on 0.0.0.0, until killed
  peers.py bulk HOST PORT MB MODE  MB each way over raw TCP; MODE blocking | nonblocking
  peers.py http HOST PORT MB       MB each way with http.client (PUT, answered by MB)
  peers.py short HOST PORT N       N connections that write right after connect()
  peers.py load HOST PORT SECONDS  HTTP/1.1 requests (keep-alive and new connections)
  peers.py tuple SRC_PORT HOST PORT ROUNDS NAME  echo rounds from a fixed source port

Servers: 7001 raw bulk, blocking sockets (a thread per connection); 7002 raw bulk,
non-blocking (asyncio); 7003 short echo (blocking); 8080 HTTP/1.1 (http.server: blocking,
buffered reads); 7101 (or NAMED_PORT) echo that prefixes NAME, for the tuple test.

Raw bulk protocol: the client sends 8 bytes (how many bytes it wants back, big endian)
then its payload, then half-closes; the server reads to end of stream, answers one line
("ok N" or "bad N <sha256>"), then its payload, then closes. Payloads are a pattern both
ends compute (SHAKE-256 of a seed, 1 MiB + 3 bytes repeated), so each end checks what it
got against the sha256 it expects. Any exception — BlockingIOError (EAGAIN) on a blocking
socket included — or a short read prints the details and exits 1.

The "blocking" sockets are truly blocking (no Python timeout, which would make the fd
non-blocking and retry EAGAIN behind our back); a watchdog alarm fails a client that hangs.
"""

import asyncio
import hashlib
import http.client
import http.server
import os
import selectors
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

BLOCK = 1048579
MB = 1 << 20


def block(seed):
    b = hashlib.shake_256(seed).digest(BLOCK)
    return memoryview(b + b)


UP = block(b"client to server")
DOWN = block(b"server to client")


def chunks(pattern, total, size=65536):
    """The pattern's first `total` bytes, in pieces of at most `size`."""
    off = 0
    left = total
    while left:
        n = min(size, left, BLOCK)
        yield pattern[off:off + n]
        off = (off + n) % BLOCK
        left -= n


def expected(pattern, total):
    h = hashlib.sha256()
    for c in chunks(pattern, total, BLOCK):
        h.update(c)
    return h.hexdigest()


def fail(what):
    print("FAIL: " + what, flush=True)
    sys.exit(1)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise EOFError("end of stream after %d of %d bytes" % (len(buf), n))
        buf += got
    return buf


def drain(recv, h):
    """Reads to end of stream with `recv`, hashing; the byte count."""
    count = 0
    while True:
        data = recv(262144)
        if not data:
            return count
        h.update(data)
        count += len(data)


# ---------------------------------------------------------------- servers


class BulkBlocking(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        want = struct.unpack("!Q", recv_exact(s, 8))[0]
        h = hashlib.sha256()
        got = drain(s.recv, h)
        s.sendall(verdict(got, h.hexdigest()))
        for c in chunks(DOWN, want):
            s.sendall(c)
        s.close()


def verdict(got, digest):
    # The client sends as many bytes as it asks for.
    if digest == expected(UP, got) and got > 0:
        return b"ok %d\n" % got
    return b"bad %d %s\n" % (got, digest.encode())


async def bulk_async(reader, writer):
    want = struct.unpack("!Q", await reader.readexactly(8))[0]
    h = hashlib.sha256()
    got = 0
    while True:
        data = await reader.read(262144)
        if not data:
            break
        h.update(data)
        got += len(data)
    writer.write(verdict(got, h.hexdigest()))
    for c in chunks(DOWN, want):
        writer.write(c)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


class ShortEcho(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        buf = b""
        while not buf.endswith(b"\n"):
            got = s.recv(4096)
            if not got:
                return
            buf += got
        s.sendall(buf)
        s.close()


class Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are separate writes: without this, Nagle holds the body until the
    # client's delayed ACK (40 ms a request).
    disable_nagle_algorithm = True

    def do_PUT(self):
        n = int(self.headers["content-length"])
        h = hashlib.sha256()
        left = n
        while left:
            data = self.rfile.read(min(262144, left))
            if not data:
                break
            h.update(data)
            left -= len(data)
        got = n - left
        want = int(self.path.rsplit("=", 1)[1])
        self.send_response(200)
        self.send_header("content-length", str(want))
        self.send_header("x-received", verdict(got, h.hexdigest()).decode().strip())
        self.end_headers()
        for c in chunks(DOWN, want):
            self.wfile.write(c)

    def do_GET(self):
        body = ("path=%s\n" % self.path).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Named(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        while True:
            data = s.recv(65536)
            if not data:
                return
            s.sendall(NAME + b":" + data)


class Threaded(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


class ThreadedHttp(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


NAME = b""


def serve(name, named_port):
    global NAME
    NAME = name.encode()
    for port, handler in ((7001, BulkBlocking), (7003, ShortEcho), (named_port, Named)):
        srv = Threaded(("0.0.0.0", port), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    web = ThreadedHttp(("0.0.0.0", 8080), Http)
    threading.Thread(target=web.serve_forever, daemon=True).start()

    async def main():
        srv = await asyncio.start_server(bulk_async, "0.0.0.0", 7002, backlog=512)
        print("peers: listening", flush=True)
        async with srv:
            await srv.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------- clients


def check_down(first, got, digest, want):
    if first != b"ok %d" % want:
        fail("the server got something else: %r" % first)
    if got != want:
        fail("short read: %d of %d bytes back" % (got, want))
    if digest != expected(DOWN, want):
        fail("corrupt data back: sha256 %s" % digest)


def bulk_blocking(host, port, total):
    s = socket.create_connection((host, port))
    s.sendall(struct.pack("!Q", total))
    for c in chunks(UP, total):
        s.sendall(c)
    s.shutdown(socket.SHUT_WR)
    f = s.makefile("rb")
    first = f.readline().strip()
    h = hashlib.sha256()
    got = drain(f.read1, h)
    check_down(first, got, h.hexdigest(), total)


def bulk_nonblocking(host, port, total):
    s = socket.create_connection((host, port), timeout=10)
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    out = [struct.pack("!Q", total)] + [bytes(c) for c in chunks(UP, total)]
    out.reverse()
    pending = b""
    inbox = bytearray()
    h = hashlib.sha256()
    got = 0
    first = None
    writing = True
    deadline = time.time() + 300
    while True:
        if time.time() > deadline:
            fail("no end of stream after 300 s (%d bytes back)" % got)
        for _key, ev in sel.select(timeout=5):
            if ev & selectors.EVENT_WRITE and writing:
                if not pending and out:
                    pending = out.pop()
                if pending:
                    try:
                        n = s.send(pending)
                        pending = pending[n:]
                    except BlockingIOError:
                        pass
                if not pending and not out:
                    s.shutdown(socket.SHUT_WR)
                    writing = False
                    sel.modify(s, selectors.EVENT_READ)
            if ev & selectors.EVENT_READ:
                try:
                    data = s.recv(262144)
                except BlockingIOError:
                    continue
                if not data:
                    if first is None:
                        fail("end of stream before the server's verdict")
                    check_down(first, got, h.hexdigest(), total)
                    return
                if first is None:
                    inbox += data
                    if b"\n" in inbox:
                        line, rest = bytes(inbox).split(b"\n", 1)
                        first = line.strip()
                        h.update(rest)
                        got += len(rest)
                else:
                    h.update(data)
                    got += len(data)


def http_bulk(host, port, total):
    c = http.client.HTTPConnection(host, port)
    c.putrequest("PUT", "/bulk?want=%d" % total)
    c.putheader("content-length", str(total))
    c.endheaders()
    for chunk in chunks(UP, total):
        c.send(chunk)
    r = c.getresponse()
    if r.status != 200:
        fail("status %d" % r.status)
    first = r.getheader("x-received", "").encode()
    h = hashlib.sha256()
    got = drain(r.read, h)
    check_down(first, got, h.hexdigest(), total)


def short(host, port, n):
    def one(i):
        msg = (b"%d " % i) + b"x" * (i % 3000) + b"\n"
        try:
            s = socket.create_connection((host, port))
            s.sendall(msg)
            back = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                back += data
            s.close()
            return None if back == msg else "connection %d: %r back for %d bytes" % (i, back[:64], len(msg))
        except Exception as e:
            return "connection %d: %s: %s" % (i, type(e).__name__, e)

    with ThreadPoolExecutor(16) as pool:
        errors = [e for e in pool.map(one, range(n)) if e]
    if errors:
        fail("%d of %d connections failed; first: %s" % (len(errors), n, "; ".join(errors[:5])))


def load(host, port, seconds):
    """Requests until `seconds` pass: every 10th on a new connection; any failure exits 1."""
    end = time.time() + seconds
    done = 0
    c = None
    while time.time() < end:
        try:
            if c is None or done % 10 == 0:
                if c is not None:
                    c.close()
                c = http.client.HTTPConnection(host, port)
            c.request("GET", "/load/%d" % done)
            r = c.getresponse()
            body = r.read()
            if r.status != 200 or body != b"path=/load/%d\n" % done:
                fail("request %d: %d %r" % (done, r.status, body))
        except Exception as e:
            fail("request %d: %s: %s" % (done, type(e).__name__, e))
        done += 1
    print("load: %d requests" % done, flush=True)


def tuple_rounds(src_port, host, port, rounds, name):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", src_port))
    s.connect((host, port))
    for i in range(rounds):
        msg = b"%s round %d " % (name.encode(), i) + b"y" * (i % 5000)
        s.sendall(msg)
        want = name.encode() + b":" + msg
        back = recv_exact(s, len(want))
        if back != want:
            fail("round %d: %r back, expected %r" % (i, back[:80], want[:80]))
    s.close()
    print("tuple: %d rounds" % rounds, flush=True)


def hung(_sig, _frame):
    # os._exit: threads blocked in a socket call would keep sys.exit waiting.
    print("FAIL: no end after %d s: hung" % WATCHDOG, flush=True)
    os._exit(1)


WATCHDOG = 240


def main():
    cmd = sys.argv[1]
    if cmd != "serve":
        signal.signal(signal.SIGALRM, hung)
        signal.alarm(WATCHDOG)
    try:
        if cmd == "serve":
            serve(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 7101)
        elif cmd == "bulk":
            host, port, mb, mode = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
            (bulk_blocking if mode == "blocking" else bulk_nonblocking)(host, port, mb * MB)
        elif cmd == "http":
            http_bulk(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) * MB)
        elif cmd == "short":
            short(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        elif cmd == "load":
            load(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        elif cmd == "tuple":
            tuple_rounds(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        else:
            fail("unknown command " + cmd)
    except SystemExit:
        raise
    except BlockingIOError as e:
        fail("%s: EAGAIN on a blocking socket: %s" % (cmd, e))
    except BaseException as e:
        fail("%s: %s: %s" % (cmd, type(e).__name__, e))
    print("peers: %s passed" % cmd, flush=True)


if __name__ == "__main__":
    main()
