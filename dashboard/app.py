"""saescope's Streamlit entry point: page config, the run picker and the navigation. Pages do the rest.

The page modules live in ``views/``, not ``pages/``: Streamlit switches to its legacy multipage mode (every
file of a ``pages/`` folder next to the entry point becomes a page, run without this script) whenever
that folder exists, even when ``st.navigation`` is used.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import access, common  # noqa: E402

st.set_page_config(page_title="saescope", page_icon="🔬", layout="wide")

pages = [
    st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("views/features.py", title="Features", icon=":material/search:"),
    st.Page("views/lens.py", title="Prompt lens", icon=":material/text_fields:"),
    st.Page("views/dark_matter.py", title="Dark matter", icon=":material/dark_mode:"),
    st.Page("views/steering.py", title="Steering", icon=":material/tune:"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("views/graph.py", title="Graph", icon=":material/account_tree:"),
    st.Page("views/circuits.py", title="Circuits", icon=":material/hub:"),
]
if not access.granted():  # before anything that names a run: the form only
    st.navigation(pages, position="hidden")  # the link's page opens once the token is given
    st.stop()
common.run_picker()
st.navigation(pages).run()
