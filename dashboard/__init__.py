"""saescope's Streamlit app: ``app.py`` builds the navigation, ``pages/`` holds one thin module per page."""
