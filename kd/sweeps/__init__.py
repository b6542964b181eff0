"""Reading finished runs back: runs (``runs``), the paper-style table (``table``), its formats
(``formats``) and plots (``plots``)."""
