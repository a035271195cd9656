"""HTTP on 127.0.0.1 for the tools and tests that drive serve.py and label.py: a free port, a JSON call, a
multipart body."""

import json
import socket
import urllib.error
import urllib.request
import uuid


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None, content_type=None, timeout=300):
    """(status, JSON answer) of a GET (no body) or POST; a 4xx or 5xx answer is returned, not raised."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(field, files, values=None):
    """(body, content type) of a multipart form with the files [(name, bytes)] in `field`, and text `values`
    {name: text} in fields of their own (a captcha's asked colour)."""
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{text}\r\n".encode()
                    for name, text in (values or {}).items())
    for name, data in files:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
