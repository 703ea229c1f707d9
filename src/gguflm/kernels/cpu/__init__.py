"""CPU providers: ``block`` (a whole decoder block step in one C++ call)."""
