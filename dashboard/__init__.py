"""saescope's Streamlit app: ``app.py`` builds the navigation, ``views/`` holds one thin module per page."""
