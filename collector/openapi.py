"""The collector API, documented: OpenAPI 3.1, served at /v1/openapi.json.

Written out by hand (see collector.app for why there is no model layer); tests/test_collector.py
checks that every route of the app is documented here and nothing else is.
"""

_ERROR = {"description": "refused; nothing was stored",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_SIGNED = {"name": "X-Sshtrail-Signature", "in": "header", "required": True,
           "description": "base64 ECDSA P-256 SHA-256 signature of the body by the host's key",
           "schema": {"type": "string"}}
_HOST = [{"clientCert": []}]
_READER = [{"readerToken": []}]
_SID = {"name": "sid", "in": "path", "required": True, "schema": {"type": "string"}}


def _q(name: str, doc: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "query", "required": False, "description": doc,
            "schema": schema or {"type": "string"}}


DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "sshtrail collector", "version": "1",
             "description": "Central store of sshtrail hosts' audit events and session "
                            "recordings. Hosts write with their client certificate; auditors "
                            "read with a reader token."},
    "components": {
        "securitySchemes": {
            "clientCert": {"type": "mutualTLS", "description": "the host's certificate from "
                                                               "`sshtrail enroll`"},
            "readerToken": {"type": "http", "scheme": "bearer",
                            "description": "from `sshtrail collector reader-token NAME`"}},
        "schemas": {"Error": {"type": "object", "required": ["error"],
                              "properties": {"error": {"type": "string"}}},
                    "Hit": {"type": "object", "properties": {
                        "kind": {"enum": ["output", "command"]},
                        "server_id": {"type": "string"}, "sid": {"type": ["string", "null"]},
                        "login": {"type": ["string", "null"]},
                        "server_hostname": {"type": ["string", "null"]},
                        "time": {"type": ["string", "null"], "description": "RFC 3339 UTC"},
                        "offset": {"type": ["number", "null"],
                                   "description": "seconds into the recording"},
                        "line": {"type": "string", "description": "the line or command "
                                 "holding the match (long ones cut around it, marked …)"},
                        "uid": {"type": "string", "description": "the command event's uid"}}}}},
    "paths": {
        "/v1/events": {
            "post": {
                "summary": "Upload a batch of events (stored whole or not at all; dedup by uid)",
                "security": _HOST, "parameters": [_SIGNED],
                "requestBody": {"required": True, "content": {"application/x-ndjson": {
                    "schema": {"type": "string"},
                    "example": '{"code":"T1000I","event":"user.login",...,"prev_hash":"...",'
                               '"seq":1,...}\n'}}},
                "responses": {"200": {"description": "stored (or already there)",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "properties": {
                                              "stored": {"type": "integer"},
                                              "duplicates": {"type": "integer"}}}}}},
                              "400": _ERROR, "401": _ERROR, "403": _ERROR, "409": _ERROR,
                              "413": _ERROR}},
            "get": {
                "summary": "Search events, oldest first, in pages",
                "security": _READER,
                "parameters": [
                    _q("since", "time >= since: epoch seconds or RFC 3339 UTC"),
                    _q("until", "time < until: epoch seconds or RFC 3339 UTC"),
                    _q("type", "event type; repeat for several"),
                    _q("user", "login"), _q("host", "server_id or server_hostname"),
                    _q("sid", "session id"),
                    _q("q", "text in a command's argv, an exec's command, an opened path"),
                    _q("limit", "page size, 1-1000 (100)", {"type": "integer"}),
                    _q("after", "the `next` cursor of the previous page")],
                "responses": {"200": {"description": "a page of events",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "properties": {
                                              "events": {"type": "array",
                                                         "items": {"type": "object"}},
                                              "next": {"type": ["string", "null"]}}}}}},
                              "400": _ERROR, "401": _ERROR}}},
        "/v1/recordings/{sid}": {
            "put": {"summary": "Create or update a recording's metadata",
                    "security": _HOST, "parameters": [_SID, _SIGNED],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object"}}}},
                    "responses": {"200": {"description": "stored"}, "400": _ERROR,
                                  "401": _ERROR, "403": _ERROR}}},
        "/v1/recordings/{sid}/chunks/{seq}": {
            "put": {"summary": "Upload one chunk of a recording (idempotent)",
                    "security": _HOST,
                    "parameters": [_SID, {"name": "seq", "in": "path", "required": True,
                                          "schema": {"type": "integer"}}, _SIGNED],
                    "requestBody": {"required": True, "content": {
                        "application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}}}},
                    "responses": {"200": {"description": "stored"}, "400": _ERROR,
                                  "401": _ERROR, "403": _ERROR, "413": _ERROR}}},
        "/v1/search": {
            "get": {
                "summary": "Find text that appeared on a recorded session's screen, or in a "
                           "command a session ran (`session.command` argv, `exec` command); "
                           "newest first, in pages",
                "description": "`q` is literal (no operators or wildcards) and matched as a "
                               "case-insensitive substring (Unicode case folding) of one line "
                               "of screen text, escape sequences removed, or of one command; "
                               "3 characters at least. A hit's `offset` is the second of the "
                               "recording at which the matched text was whole on screen "
                               "(`sshtrail play SID --at OFFSET` opens there); null for a "
                               "command of a session without recording.",
                "security": _READER,
                "parameters": [
                    {"name": "q", "in": "query", "required": True, "schema": {
                        "type": "string", "minLength": 3}, "description": "the text to find"},
                    _q("user", "login"), _q("host", "server_id or server_hostname"),
                    _q("since", "hit time >= since: epoch seconds or RFC 3339 UTC"),
                    _q("until", "hit time < until: epoch seconds or RFC 3339 UTC"),
                    _q("kind", "output or command; repeat for both (default both)"),
                    _q("limit", "page size, 1-1000 (50)", {"type": "integer"}),
                    _q("before", "the `next` cursor of the previous page")],
                "responses": {"200": {"description": "a page of hits, newest first",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "properties": {
                                              "hits": {"type": "array", "items": {
                                                  "$ref": "#/components/schemas/Hit"}},
                                              "next": {"type": ["string", "null"]}}}}}},
                              "400": _ERROR, "401": _ERROR}}},
        "/v1/sessions": {
            "get": {"summary": "Recorded sessions, newest first", "security": _READER,
                    "parameters": [_q("since", "started at or after"), _q("user", "login"),
                                   _q("host", "server_id"),
                                   _q("limit", "1-1000 (100)", {"type": "integer"})],
                    "responses": {"200": {"description": "sessions"}, "401": _ERROR}}},
        "/v1/sessions/{sid}/recording": {
            "get": {"summary": "A session's recording as asciicast v2", "security": _READER,
                    "parameters": [_SID, _q("host", "server_id, where two hosts share a sid")],
                    "responses": {"200": {"description": "asciicast v2", "content": {
                        "application/x-asciicast": {"schema": {"type": "string"}}}},
                        "401": _ERROR, "404": _ERROR}}},
        "/v1/hosts": {
            "get": {"summary": "Enrolled hosts", "security": _READER,
                    "responses": {"200": {"description": "hosts"}, "401": _ERROR}}},
        "/v1/ca": {
            "get": {"summary": "The collector's CA certificate (PEM); a new host checks it "
                               "against the fingerprint in its enrollment token",
                    "responses": {"200": {"description": "PEM"}}}},
        "/v1/enroll": {
            "post": {"summary": "Exchange a single-use token and a CSR for a host certificate",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "required": ["token", "csr"],
                                    "properties": {"token": {"type": "string"},
                                                   "csr": {"type": "string"}}}}}},
                     "responses": {"200": {"description": "the certificate"}, "400": _ERROR,
                                   "403": _ERROR}}},
        "/v1/openapi.json": {"get": {"summary": "This document",
                                     "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "up"}}}},
    },
}
