"""saescope's Streamlit entry point: page config, the run picker and the navigation. Pages do the rest."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import common  # noqa: E402

st.set_page_config(page_title="saescope", page_icon="🔬", layout="wide")

pages = [
    st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("pages/features.py", title="Features", icon=":material/search:"),
    st.Page("pages/lens.py", title="Prompt lens", icon=":material/text_fields:"),
    st.Page("pages/dark_matter.py", title="Dark matter", icon=":material/dark_mode:"),
    st.Page("pages/steering.py", title="Steering", icon=":material/tune:"),
]
nav = st.navigation(pages)
common.run_picker()
nav.run()
