"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks, from tests/).

The service refuses email addresses at special-use domains (.test, .local, .invalid, ...), as
email-validator does and as the schema's description says; JSON Schema's `format: email` cannot
say so. Generate valid addresses at ordinary domains instead.
"""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

schemathesis.openapi.format("email", st.emails(domains=st.sampled_from(["example.com", "mail.example.org"])))
