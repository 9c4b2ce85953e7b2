"""The Streamlit app's services (placeholder; filled in by the next commit)."""
