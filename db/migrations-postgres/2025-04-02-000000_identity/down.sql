DROP TABLE tokens;
DROP TABLE role_assignments;
DROP TABLE users;
DROP TABLE projects;
