"""CPU providers: ``block`` (a whole decoder block step in one C++ call) and ``threads``
(the adaptive thread cap of decode steps while another process keeps a core busy)."""
