#!/usr/bin/env python3
"""Print a read-only service SAS query string for one blob of Azurite's development account.

    azure_sas.py ACCOUNT CONTAINER/BLOB

String-to-sign for sv=2021-08-06 (formats.md §3.4): sp, st, se, canonical resource,
si, sip, spr, sv, sr, snapshot time, encryption scope, rscc, rscd, rsce, rscl, rsct,
joined by newlines and signed with HMAC-SHA256 under the account key. The key is the
emulator's published development key (works only against Azurite).
"""
import base64
import hashlib
import hmac
import sys
import urllib.parse

KEY = base64.b64decode(
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
VERSION = "2021-08-06"
EXPIRY = "2099-01-01T00:00:00Z"


def main():
    account, blob_path = sys.argv[1], sys.argv[2]
    fields = ["r", "", EXPIRY, f"/blob/{account}/{blob_path}", "", "", "", VERSION, "b",
              "", "", "", "", "", "", ""]
    to_sign = "\n".join(fields)
    sig = base64.b64encode(hmac.new(KEY, to_sign.encode(), hashlib.sha256).digest()).decode()
    query = {"sv": VERSION, "sr": "b", "sp": "r", "se": EXPIRY, "sig": sig}
    print(urllib.parse.urlencode(query, safe=""))


if __name__ == "__main__":
    main()
