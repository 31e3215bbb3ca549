"""Who may use the app and what it may change: an access token for a server other machines can reach, and read-only
mode. ``saescope serve`` sets both in the server's environment (``--token``/``$SAESCOPE_TOKEN``, ``--read-only``).

Streamlit has no accounts: every browser session gives the token once (``?token=`` in the link ``saescope serve``
prints, or the form), before any page or run name shows. Loopback servers started without a token stay open.
"""

from __future__ import annotations

import hmac

import streamlit as st

from engine import settings

TOKEN_ENV = settings.TOKEN.name
"""The access token every session must give; unset or empty: none (a loopback server)."""
READ_ONLY_ENV = settings.READ_ONLY.name
"""``1``: the app's actions that write into runs (explaining a latent, comparing two runs) are turned off."""
GRANTED = "access_granted"


def required_token() -> str:
    return settings.get(settings.TOKEN, "")


def read_only() -> bool:
    return settings.get(settings.READ_ONLY, False)


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison (the time taken says nothing about how much of ``given`` was right)."""
    return hmac.compare_digest(given.encode(), token.encode())


def granted() -> bool:
    """Whether this session may see the app: no token is required, it gave the token earlier, or the link carries it
    (then taken out of the address bar, so a copied link does not). Otherwise a form asks for it."""
    token, given = required_token(), st.query_params.get("token")
    if given is not None:
        del st.query_params["token"]
    if not token or st.session_state.get(GRANTED):
        return True
    if given is not None:
        if token_matches(given, token):
            st.session_state[GRANTED] = True
            return True
        st.error("The access token in the link is wrong.", icon=":material/lock:")
    st.title("saescope")
    with st.form("access"):
        typed = st.text_input("Access token", type="password",
                              help="`saescope serve` printed it when it started (its link carries it)")
        if st.form_submit_button("Open", type="primary"):
            if token_matches(typed, token):
                st.session_state[GRANTED] = True
                st.rerun()
            st.error("Wrong access token.", icon=":material/lock:")
    return False


def write_button(label: str, *, writes: str, **kwargs) -> bool:
    """``st.button`` for an action that writes into a run: on a read-only server it is shown disabled, with
    ``writes`` (what it would write) saying why, and never reports a click."""
    if not read_only():
        return st.button(label, **kwargs)
    kwargs["help"] = f"Turned off: this server is read-only, so it does not write {writes}"
    st.button(label, disabled=True, **kwargs)
    st.caption(f"This server is read-only (`saescope serve --read-only`): it does not write {writes}.")
    return False
