"""Generation: what is loaded (`Pipeline`), the request and its one resolution into a `Plan`, the stages of
`generate`, images and infotexts."""
