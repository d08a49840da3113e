"""The Open Inference (v2) protocol's infer request and response, JSON or with the binary tensor extension.

The binary tensor data extension (what tritonclient and the kserve SDK send by default): the body
starts with ``Inference-Header-Content-Length`` bytes of JSON; each input whose parameters carry
``binary_data_size`` takes that many bytes of what follows, in the order of the inputs. A BYTES
tensor in binary is its elements one after another, each a 4-byte little-endian length and the
bytes (so an image needs no base64). The response is binary where the request asks for it
(``parameters.binary_data_output``, or an output's ``parameters.binary_data``).

This module knows the protocol, not the model: the server hands it what the captioner answers.
"""

from __future__ import annotations

import json
import math
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
INPUTS = {"image": "BYTES", "uri": "BYTES"}  # raw image bytes (base64 strings in JSON), or URIs to fetch
OUTPUTS = {"caption": "BYTES", "score": "FP32"}


class ProtocolError(ValueError):
    """A request the protocol refuses (400), with what is wrong in it."""


class TooLarge(ProtocolError):
    """More elements than the server takes in one request (413), said before the data is parsed."""


def _parameters(holder: dict, what: str) -> dict:
    value = holder.get("parameters")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: parameters must be an object, not {type(value).__name__}")
    return value


@dataclass
class InferRequest:
    instances: list  # bytes (binary), base64 strings (JSON) or {"uri": ...}
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    binary_outputs: set[str] = field(default_factory=set)
    id: str | None = None


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """A BYTES tensor's binary form: each element a 4-byte little-endian length, then its bytes."""
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: binary data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise ProtocolError(f"input {name!r}: an element of {size} bytes runs past the binary data")
        elements.append(raw[at:at + size])
        at += size
    return elements


def _flatten(data: Any, name: str) -> list:
    """JSON tensor data, flat or nested in row-major order, as its elements."""
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: data must be a list")
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def parse_request(body: bytes, header_length: str | None, max_elements: int | None = None) -> InferRequest:
    """The infer request in ``body`` (``header_length``: the ``Inference-Header-Content-Length`` header, if any);
    an input whose shape holds more than ``max_elements`` is refused before its data is read."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()) or not 0 < int(header_length) <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH}: {header_length!r} is not a length within the {len(body)}-byte body")
        header, binary = body[:int(header_length)], body[int(header_length):]
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("the request body is not JSON (or nested too deeply)"
                            + (f"; with binary tensors, {HEADER_LENGTH} must give the JSON's length"
                               if header_length is None and b"\0" in body[:65536] else "")) from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ProtocolError("expected {\"inputs\": [{\"name\": \"image\", \"datatype\": \"BYTES\", ...}]}")
    if "id" in request and not isinstance(request["id"], str):
        raise ProtocolError(f"id must be a string, not {type(request['id']).__name__}")

    given: dict[str, list] = {}
    offset = 0
    for n, tensor in enumerate(request["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ProtocolError(f"inputs[{n}]: expected an object with a name")
        name = tensor["name"]
        if name not in INPUTS:
            raise ProtocolError(f"input {name!r}: this model takes {' or '.join(map(repr, INPUTS))}")
        if name in given:
            raise ProtocolError(f"input {name!r}: given twice")
        if tensor.get("datatype") != INPUTS[name]:
            raise ProtocolError(f"input {name!r}: datatype {tensor.get('datatype')!r}, expected {INPUTS[name]}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers, not {shape!r}")
        if max_elements is not None and math.prod(shape) > max_elements:
            raise TooLarge(f"input {name!r}: shape {shape} holds {math.prod(shape)} images, more than the limit of "
                           f"{max_elements} per request")
        size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise ProtocolError(f"input {name!r}: both data and binary_data_size")
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the {len(binary)} bytes "
                                    "of binary data")
            elements = _bytes_elements(binary[offset:offset + size], name)
            offset += size
            if name == "uri":
                try:
                    elements = [e.decode() for e in elements]
                except UnicodeDecodeError:
                    raise ProtocolError("input 'uri': an element is not UTF-8") from None
        else:
            elements = _flatten(tensor.get("data"), name)
            if not all(isinstance(e, str) for e in elements):
                raise ProtocolError(f"input {name!r}: data must be strings (base64 for image)")
        if math.prod(shape) != len(elements):
            raise ProtocolError(f"input {name!r}: shape {shape} holds {math.prod(shape)} elements, the data "
                                f"{len(elements)}")
        given[name] = elements
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data no input claims (binary_data_size)")
    if len(given) != 1:
        raise ProtocolError("one input: 'image' (BYTES: raw bytes in binary, base64 in JSON) or 'uri' (BYTES)"
                            + ("; not both" if len(given) > 1 else ""))
    (name, elements), = given.items()
    instances = [{"uri": e} for e in elements] if name == "uri" else elements

    binary_all = bool(_parameters(request, "the request").get("binary_data_output"))
    outputs, binary_outputs = list(OUTPUTS), set(OUTPUTS) if binary_all else set()
    if request.get("outputs") is not None:
        wanted = request["outputs"]
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                   for o in wanted):
            raise ProtocolError("outputs must be a list of {\"name\": ...}")
        unknown = [o["name"] for o in wanted if o["name"] not in OUTPUTS]
        if unknown:
            raise ProtocolError(f"unknown output {', '.join(map(repr, unknown))}: this model answers "
                                f"{' and '.join(map(repr, OUTPUTS))}")
        outputs = list(dict.fromkeys(o["name"] for o in wanted))
        binary_outputs = {o["name"] for o in wanted
                          if _parameters(o, f"output {o['name']!r}").get("binary_data", binary_all)}
    return InferRequest(instances, outputs, binary_outputs & set(outputs), request.get("id"))


def _binary(datatype: str, values: list) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in (s.encode() for s in values))
    return struct.pack(f"<{len(values)}f", *values)


def encode_response(request: InferRequest, model_name: str, model_version: str | None,
                    values: dict[str, list]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON then the binary outputs where asked."""
    tensors, blobs = [], []
    for name in request.outputs:
        tensor = {"name": name, "datatype": OUTPUTS[name], "shape": [len(values[name])]}
        if name in request.binary_outputs:
            blob = _binary(OUTPUTS[name], values[name])
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = values[name]
        tensors.append(tensor)
    head = json.dumps({"model_name": model_name, "model_version": model_version,
                       "id": request.id if request.id is not None else str(uuid.uuid4()),
                       "outputs": tensors}).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
