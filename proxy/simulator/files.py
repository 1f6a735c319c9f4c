"""File uploads (multipart `POST /v1/files`) and their contents.

Stripe serves uploads from files.stripe.com; the simulator serves them itself, so a file's
`url` points back at the simulator's own address.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from typing import Final

from proxy.simulator.call import Call, Outcome, required
from proxy.simulator.errors import invalid, resource_missing
from proxy.simulator.store import Store

PURPOSES: Final = frozenset({
    "account_requirement", "additional_verification", "business_icon", "business_logo",
    "customer_signature", "dispute_evidence", "finance_report_run", "financial_account_statement",
    "identity_document", "identity_document_downloadable", "issuing_regulatory_reporting",
    "pci_document", "platform_terms_of_service", "selfie", "sigma_scheduled_query",
    "tax_document_user_upload", "terminal_android_apk", "terminal_reader_splashscreen",
})


@dataclass(frozen=True, slots=True)
class Upload:
    """The `file` part of a multipart upload."""

    filename: str
    content: bytes

    def fingerprint(self) -> str:
        """What identifies the upload for idempotency: name and content hash."""
        return f"{self.filename}:{hashlib.sha1(self.content).hexdigest()}"


def create(store: Store, call: Call) -> Outcome:
    """POST /v1/files."""
    purpose = required(call.params, "purpose")
    upload = required(call.params, "file")
    if purpose not in PURPOSES:
        raise invalid(f"Invalid purpose: {purpose}. Must be one of "
                      + ", ".join(sorted(PURPOSES)) + ".", param="purpose")
    if not isinstance(upload, Upload):
        raise invalid("Invalid file: must be uploaded as multipart/form-data.", param="file")
    fid = store.new_id("file")
    name = upload.filename.replace("\\", "/").rsplit("/", 1)[-1] or "blob"
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else None
    obj = {
        "id": fid,
        "object": "file",
        "created": store.now(),
        "expires_at": None,
        "filename": name,
        "links": {"object": "list", "data": [], "has_more": False,
                  "url": f"/v1/file_links?file={fid}"},
        "purpose": purpose,
        "size": len(upload.content),
        "title": None,
        "type": ext,
        "url": f"{call.base_url}/v1/files/{fid}/contents",
    }
    store.files[fid] = obj
    store.file_contents[fid] = upload.content
    return Outcome.ok(obj, wrote=True)


def retrieve(store: Store, call: Call) -> Outcome:
    """GET /v1/files/{id}."""
    obj = store.files.get(call.ids[0])
    if obj is None:
        raise resource_missing("file", call.ids[0])
    return Outcome.ok(obj)


def contents(store: Store, call: Call) -> Outcome:
    """GET /v1/files/{id}/contents: the uploaded bytes, as uploaded."""
    fid = call.ids[0]
    data = store.file_contents.get(fid)
    if data is None:
        raise resource_missing("file", fid)
    kind = mimetypes.guess_type(store.files[fid]["filename"])[0] or "application/octet-stream"
    return Outcome(200, data, content_type=kind)
