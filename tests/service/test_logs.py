"""Structured JSON log lines."""

from __future__ import annotations

import json
import logging

from service.logs import JsonFormatter, request_id_var


def test_json_log_lines_carry_the_request_id() -> None:
    record = logging.LogRecord("service.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.model = "digits"
    token = request_id_var.set("rid-1")
    try:
        entry = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert entry["message"] == "hello you" and entry["request_id"] == "rid-1" and entry["model"] == "digits"
    assert entry["level"] == "INFO" and entry["time"].endswith("Z")
