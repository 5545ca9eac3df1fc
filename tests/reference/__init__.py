"""Independent re-implementations of upstream code, the references the golden tests compare against."""
